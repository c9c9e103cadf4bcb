//! Network namespaces for the multi-host tests: a laptop, the appliance and a
//! container network, each its own namespace joined by veth pairs, plus a
//! wireguard-go peer (the independent WireGuard implementation).
//!
//! Names are unique per process and call (`<prefix><pid % 100000><n>`, at most
//! 15 bytes, the Linux limit), because wireguard-go's and Wayfinder's control
//! sockets live in /var/run/wireguard for every namespace alike. Dropping a
//! [`Netns`] kills what runs in it and deletes it; children also die with the
//! test process.

#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{die_with_parent, require};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this process and call, at most 15 bytes with a 3-byte prefix.
pub fn unique(prefix: &str) -> String {
    let name = format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 15, "{name} is longer than an interface name may be");
    name
}

/// Runs `cmd` to completion and fails the test (with its output) unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace with loopback up.
pub struct Netns {
    /// Its name (`ip netns exec <name>`).
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    /// Creates a fresh namespace.
    pub fn new() -> Self {
        require("ip");
        let name = unique("wfn");
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>` (split on spaces), which must succeed.
    pub fn ip(&self, args: &str) {
        run(Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args.split_whitespace()));
    }

    /// A command running `program` inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace to completion (any exit status).
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run {program} in {}: {e}", self.name))
    }

    /// Starts `cmd` (made with [`Self::cmd`]) in the background, logging to `log`;
    /// it is killed when the namespace drops.
    pub fn spawn(&mut self, mut cmd: Command, log: &Path) -> u32 {
        let file = std::fs::File::create(log).unwrap();
        cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        let child = die_with_parent(&mut cmd).spawn().expect("spawn in namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates
    /// belong to the namespace and stay usable from any thread afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                // SAFETY: setns on this thread only, with a namespace fd we own.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into {}: {}", self.name, std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread")
        })
    }

    /// `dig @server <args> +short` inside the namespace, one try of `secs`
    /// seconds: the answer lines, trimmed.
    pub fn dig_short(&self, server: &str, args: &[&str], secs: u32) -> String {
        require("dig");
        let server = format!("@{server}");
        let time = format!("+time={secs}");
        let mut all = vec![server.as_str()];
        all.extend_from_slice(args);
        all.extend(["+short", time.as_str(), "+tries=1"]);
        String::from_utf8_lossy(&self.output("dig", &all).stdout)
            .trim()
            .to_string()
    }

    /// Asks `server` for `name SRV` until an answer names `port` (within
    /// `limit`); on timeout the test fails with `context()` (a log, say).
    pub fn wait_for_srv(&self, server: &str, name: &str, port: u16, limit: Duration, context: impl Fn() -> String) {
        let deadline = Instant::now() + limit;
        let want = format!(" {port} ");
        loop {
            let answer = self.dig_short(server, &[name, "SRV"], 1);
            if answer.contains(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no SRV answer for {name} from {server} in {limit:?}: {answer:?}\n{}",
                context()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A counter of interface `dev` (`rx_packets`, `tx_bytes`, ...).
    pub fn counter(&self, dev: &str, name: &str) -> u64 {
        let out = self.output("cat", &[&format!("/sys/class/net/{dev}/statistics/{name}")]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SIGTERM first so daemons remove their sockets, then make sure.
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: plain kill(2); these processes run in our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair from `a` (named `a_if`, address `a_addr` with prefix) to `b`.
pub fn link(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    // Created inside `a` with its peer moved to `b` at once: the names never
    // exist in the host namespace, so parallel tests cannot collide on them.
    a.ip(&format!("link add {a_if} type veth peer name {b_if} netns {}", b.name));
    a.ip(&format!("addr add {a_addr} dev {a_if}"));
    b.ip(&format!("addr add {b_addr} dev {b_if}"));
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

/// A veth pair from a port of `bridge` in `switch` to `host` (named `host_if`,
/// address `host_addr` with prefix): a host plugged into a switch.
pub fn link_to_bridge(switch: &Netns, bridge: &str, port: &str, host: &Netns, host_if: &str, host_addr: &str) {
    switch.ip(&format!(
        "link add {port} type veth peer name {host_if} netns {}",
        host.name
    ));
    switch.ip(&format!("link set {port} master {bridge}"));
    switch.ip(&format!("link set {port} up"));
    host.ip(&format!("addr add {host_addr} dev {host_if}"));
    host.ip(&format!("link set {host_if} up"));
}

/// A wireguard-go interface in a namespace: the laptop's WireGuard.
pub struct WireguardGo {
    /// Interface name (also its /var/run/wireguard socket name).
    pub interface: String,
    dir: tempfile::TempDir,
}

impl WireguardGo {
    /// Starts wireguard-go in `ns` and waits for its control socket.
    pub fn start(ns: &mut Netns) -> Self {
        require("wireguard-go");
        require("wg");
        let interface = unique("wft");
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = ns.cmd("wireguard-go");
        cmd.args(["-f", &interface]);
        ns.spawn(cmd, &dir.path().join("wireguard-go.log"));
        let sock = PathBuf::from(format!("/var/run/wireguard/{interface}.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go made no control socket {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        WireguardGo { interface, dir }
    }

    /// Configures it from a wg-quick client file, as a laptop would: the file is
    /// stripped by `wg-quick strip` and loaded with `wg setconf`; Address, MTU
    /// and the AllowedIPs routes are applied with `ip`.
    pub fn configure(&self, ns: &Netns, client_config: &str) {
        require("wg-quick");
        let file = self.dir.path().join(format!("{}.conf", self.interface));
        std::fs::write(&file, client_config).unwrap();
        let stripped = run(Command::new("wg-quick").arg("strip").arg(&file));
        let plain = self.dir.path().join("stripped.conf");
        std::fs::write(&plain, &stripped.stdout).unwrap();
        run(Command::new("wg").args(["setconf", &self.interface]).arg(&plain));
        let value = |key: &str| {
            client_config
                .lines()
                .find_map(|l| {
                    l.split_once('=')
                        .filter(|(k, _)| k.trim() == key)
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_else(|| panic!("{key} missing from\n{client_config}"))
        };
        ns.ip(&format!("addr add {} dev {}", value("Address"), self.interface));
        ns.ip(&format!("link set {} mtu {} up", self.interface, value("MTU")));
        for net in value("AllowedIPs").split(',') {
            ns.ip(&format!("route add {} dev {}", net.trim(), self.interface));
        }
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        // The process dies with its namespace; a killed one leaves its socket.
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.interface));
    }
}
