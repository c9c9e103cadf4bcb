//! Real components for the integration tests: a Consul agent, an unbound upstream,
//! `dig`, and Wayfinder (in-process on a [`free_port`], or the built binary).
//!
//! Every port is picked free at run time and every process is killed when its
//! handle drops (or, for the shared agent, when the test binary exits), so test
//! binaries and tests within one run in parallel without colliding. A missing
//! program is a failure naming the install step, never a skipped test.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wayfinder::dns::{self, DnsControl, DnsSockets};
use wayfinder::supervisor::unit::UnitInfo;
use wayfinder::supervisor::{SupervisorState, UpConfig, UpSockets};

/// Sends Wayfinder's logs to the test's output (shown for a failing test),
/// filtered by `RUST_LOG` (nothing when it is unset).
pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Fails the test when `program` is not installed, naming the fix.
pub fn require(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{program}` is not installed: run `scripts/install-deps.sh` (the README's test command does)")
    })
}

/// A port free for both UDP and TCP on 127.0.0.1 right now, for a server of a
/// test to bind, taken from below the kernel's ephemeral range, never from it.
///
/// A port from the ephemeral range can be handed to a client at the same time:
/// dig (BIND 9.18) sets SO_REUSEPORT on its UDP socket and binds 0.0.0.0:0, so
/// the kernel may give it the port of a server of the same user that also set
/// SO_REUSEPORT (Wayfinder's dns workers, unbound); dig then sends to itself and
/// reads its own question back ("query response not set"). TCP clients'
/// ports come from that range too. Ports are handed out in turn (a process-wide
/// counter from a per-process start), each checked bindable.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_low >= LOWEST + 1_000,
        "net.ipv4.ip_local_port_range starts at {ephemeral_low}: the tests need ports \
         {LOWEST}..{} outside it (sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\")",
        LOWEST + 1_000
    );
    let span = ephemeral_low - LOWEST;
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port = (LOWEST + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for UDP and TCP on 127.0.0.1 in {LOWEST}..{ephemeral_low}");
}

/// Puts the child in its own process group and kills it if the test process dies.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl and setpgid are async-signal-safe and touch only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Ports of one Consul agent.
#[derive(Debug, Clone, Copy)]
pub struct ConsulPorts {
    /// HTTP API.
    pub http: u16,
    /// DNS interface.
    pub dns: u16,
    grpc: u16,
    serf_lan: u16,
    serf_wan: u16,
    server: u16,
}

impl ConsulPorts {
    fn pick() -> Self {
        Self {
            http: free_port(),
            dns: free_port(),
            grpc: free_port(),
            serf_lan: free_port(),
            serf_wan: free_port(),
            server: free_port(),
        }
    }
}

/// A real Consul agent in dev mode (single-node server, in-memory state).
pub struct Consul {
    child: Option<Child>,
    /// Its ports.
    pub ports: ConsulPorts,
    /// Holds the agent's log.
    dir: PathBuf,
    /// Removes `dir` on drop (private agents; the shared one is swept later).
    _cleanup: Option<tempfile::TempDir>,
    /// Its datacenter.
    pub datacenter: String,
    /// Raised `http_max_conns_per_client` (only the shared agent: every test of
    /// the binary talks to it from 127.0.0.1). Private agents keep Consul's
    /// default of 200, as users run it.
    many_clients: bool,
}

impl Consul {
    /// Starts a private agent (for tests that stop or restart Consul).
    pub fn start() -> Self {
        Self::start_in("dc1")
    }

    /// Starts a private agent in datacenter `dc`.
    pub fn start_in(dc: &str) -> Self {
        let mut consul = Self::stopped_in(dc);
        consul.launch_on_free_ports();
        consul
    }

    /// A private agent whose ports are chosen but which is not running yet
    /// ([`Self::launch`] starts it).
    pub fn stopped_in(dc: &str) -> Self {
        let temp = tempfile::tempdir().unwrap();
        Consul {
            child: None,
            ports: ConsulPorts::pick(),
            dir: temp.path().to_path_buf(),
            _cleanup: Some(temp),
            datacenter: dc.to_string(),
            many_clients: false,
        }
    }

    /// Federates this agent's datacenter with `other`'s over the WAN and waits
    /// until each lists both datacenters.
    pub fn join_wan(&self, other: &Consul) {
        let target = format!("127.0.0.1:{}", other.ports.serf_wan);
        http_put(self.http_addr(), &format!("/v1/agent/join/{target}?wan=1"), "").expect("wan join");
        let deadline = Instant::now() + Duration::from_secs(30);
        for agent in [self, other] {
            loop {
                let dcs = http_get(agent.http_addr(), "/v1/catalog/datacenters").unwrap_or_default();
                if dcs.contains(&format!("\"{}\"", self.datacenter))
                    && dcs.contains(&format!("\"{}\"", other.datacenter))
                {
                    break;
                }
                assert!(Instant::now() < deadline, "WAN join did not complete: {dcs}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The shared agent lives as long as the process, which never drops statics:
    /// its log goes to a directory named after our pid, and directories of test
    /// processes that have exited are removed here.
    fn start_shared() -> Self {
        let base = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("wayfinder-test-consul-")
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("wayfinder-test-consul-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut consul = Consul {
            child: None,
            ports: ConsulPorts::pick(),
            dir,
            _cleanup: None,
            datacenter: "dc1".into(),
            many_clients: true,
        };
        consul.launch_on_free_ports();
        consul
    }

    /// One agent shared by every test of this binary that only registers
    /// services under names of its own. Dies with the test process.
    pub fn shared() -> &'static Consul {
        static SHARED: OnceLock<Consul> = OnceLock::new();
        SHARED.get_or_init(|| {
            // PDEATHSIG fires when the *thread* that spawned the child exits, so
            // the shared agent is spawned from a thread that lives forever.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                tx.send(Consul::start_shared()).unwrap();
                loop {
                    std::thread::park();
                }
            });
            rx.recv().unwrap()
        })
    }

    /// Starts the agent; `free_port` only saw the ports free a moment ago, so
    /// when a parallel test took one in between, new ports are picked.
    fn launch_on_free_ports(&mut self) {
        for _ in 0..4 {
            match self.try_launch() {
                Ok(()) => return,
                Err(log) if log.contains("address already in use") => self.ports = ConsulPorts::pick(),
                Err(log) => panic!("consul did not start; log:\n{log}"),
            }
        }
        panic!("consul found no free ports in 4 tries");
    }

    /// Starts the agent on its current ports (a restart keeps them).
    pub fn launch(&mut self) {
        for _ in 0..4 {
            match self.try_launch() {
                Ok(()) => return,
                Err(log) if log.contains("address already in use") => std::thread::sleep(Duration::from_millis(500)),
                Err(log) => panic!("consul did not start; log:\n{log}"),
            }
        }
        panic!("consul could not get its ports back in 4 tries");
    }

    fn try_launch(&mut self) -> Result<(), String> {
        let p = self.ports;
        let log = std::fs::File::create(self.dir.join("consul.log")).unwrap();
        let mut cmd = Command::new(require("consul"));
        cmd.args(["agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .args(["-http-port", &p.http.to_string()])
            .args(["-dns-port", &p.dns.to_string()])
            .args(["-grpc-port", &p.grpc.to_string()])
            .args(["-serf-lan-port", &p.serf_lan.to_string()])
            .args(["-serf-wan-port", &p.serf_wan.to_string()])
            .args(["-server-port", &p.server.to_string()])
            .args(["-node", &format!("node-{}", p.http)])
            .args(["-datacenter", &self.datacenter])
            .args(["-hcl", "dns_config { enable_truncate = true }"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        if self.many_clients {
            // Every test of the binary talks to the shared agent from 127.0.0.1:
            // Consul's default of 200 connections per client address is too few.
            cmd.args(["-hcl", "limits { http_max_conns_per_client = 4096 }"]);
        }
        self.child = Some(die_with_parent(&mut cmd).spawn().expect("start consul"));
        self.wait_ready()
    }

    /// Waits for a leader; the agent's log when it exits or never gets one.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = |dir: &Path| std::fs::read_to_string(dir.join("consul.log")).unwrap_or_default();
        loop {
            if let Ok(body) = http_get(self.http_addr(), "/v1/status/leader")
                && body.trim().len() > 2
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("(exited: {status})\n{}", log(&self.dir)));
            }
            if Instant::now() >= deadline {
                return Err(format!("(no leader in 30 s)\n{}", log(&self.dir)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// HTTP API address.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.http))
    }

    /// DNS interface address.
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.dns))
    }

    /// Stops the agent (its state is lost: dev mode).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    /// Freezes the agent (SIGSTOP): it answers nothing, and what is sent to
    /// it waits in its sockets until [`Self::resume`]. Returns once every
    /// thread of the agent is stopped: `kill` returns when the signal is
    /// queued and one thread woken; the others stop only when that thread has
    /// run, and until then (long under load) they still answer questions.
    pub fn pause(&self) {
        self.signal("-STOP");
        self.wait_threads("stopped", |state| matches!(state, 'T' | 't' | 'Z' | 'X'));
    }

    /// Lets a paused agent run again (SIGCONT): it answers what waited.
    /// Returns once no thread of the agent is stopped.
    pub fn resume(&self) {
        self.signal("-CONT");
        self.wait_threads("running", |state| state != 'T');
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// Waits (10 s at most) until the state of every thread of the agent, from
    /// `/proc/<pid>/task/*/stat`, is one `ok` accepts.
    fn wait_threads(&self, what: &str, ok: impl Fn(char) -> bool) {
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states = thread_states(pid);
            if !states.is_empty() && states.iter().all(|&(_, s)| ok(s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consul (pid {pid}) not {what} 10 s after the signal; threads (tid, state): {states:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Registers a service instance; `check_ttl` adds a TTL check `service:<id>`
    /// starting in `passing` state.
    pub fn register(&self, id: &str, name: &str, address: &str, port: u16, tags: &[&str], check_ttl: bool) {
        let mut body = serde_json::json!({
            "ID": id, "Name": name, "Address": address, "Port": port, "Tags": tags,
        });
        if check_ttl {
            body["Check"] = serde_json::json!({ "TTL": "10m", "Status": "passing" });
        }
        http_put(self.http_addr(), "/v1/agent/service/register", &body.to_string()).expect("register");
    }

    /// Registers many instances at once through `/v1/txn` (64 operations per
    /// transaction, Consul's limit), on node `node` at `address`; each instance
    /// gets a passing check unless `with_check` is false.
    pub fn register_bulk(&self, node: &str, address: &str, instances: &[BulkInstance], with_check: bool) {
        let mut ops = vec![serde_json::json!({"Node": {"Verb": "set", "Node": {"Node": node, "Address": address}}})];
        for i in instances {
            ops.push(serde_json::json!({"Service": {"Verb": "set", "Node": node, "Service": {
                "ID": i.id, "Service": i.name, "Address": i.address, "Port": i.port, "Tags": i.tags}}}));
            if with_check {
                ops.push(serde_json::json!({"Check": {"Verb": "set", "Check": {
                    "Node": node, "CheckID": format!("{}-check", i.id), "Name": "bulk",
                    "Status": "passing", "ServiceID": i.id}}}));
            }
        }
        for chunk in ops.chunks(64) {
            let body = serde_json::Value::Array(chunk.to_vec()).to_string();
            http_put(self.http_addr(), "/v1/txn", &body).expect("txn register");
        }
    }

    /// Removes a service instance.
    pub fn deregister(&self, id: &str) {
        http_put(self.http_addr(), &format!("/v1/agent/service/deregister/{id}"), "").expect("deregister");
    }

    /// Sets the TTL check of instance `id` to passing or critical.
    pub fn set_health(&self, id: &str, passing: bool) {
        let verb = if passing { "pass" } else { "fail" };
        http_put(self.http_addr(), &format!("/v1/agent/check/{verb}/service:{id}"), "").expect("set health");
    }

    /// Waits until the catalog reports exactly `count` passing instances of `name`.
    pub fn wait_passing(&self, name: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let body = http_get(self.http_addr(), &format!("/v1/health/service/{name}?passing=1")).unwrap_or_default();
            let n = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(usize::MAX);
            if n == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: wanted {count} passing instances, consul has {n}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One instance for [`Consul::register_bulk`].
#[derive(Debug, Clone)]
pub struct BulkInstance {
    /// Service ID.
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
}

/// The scheduler state (`R`, `S`, `T`, ...) of every thread of process `pid`,
/// with its thread ID, from `/proc/<pid>/task/*/stat` (the state follows the
/// `)` that closes the command name, which may itself hold `)`).
fn thread_states(pid: u32) -> Vec<(u32, char)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            // A thread that exited in between has no stat any more.
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some((tid, state))
        })
        .collect()
}

/// ESTABLISHED TCP connections that process `pid` holds to `port` on any
/// address (from its fds and `/proc/<pid>/net/tcp{,6}`, as `ss -tp` does).
pub fn connections_to(pid: u32, port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let remote_port = f[2].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            // st 01 = ESTABLISHED; f[9] is the inode.
            if remote_port == Some(port) && f[3] == "01" && inodes.contains(f[9]) {
                count += 1;
            }
        }
    }
    count
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop();
    }
}

fn http_request(addr: SocketAddr, request: String) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")) {
        return Err(std::io::Error::other(format!("{head}\n{body}")));
    }
    Ok(body.to_string())
}

/// A plain HTTP/1.0 GET (no chunked bodies; keeps the harness free of async in setup code).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    http_request(
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// A plain HTTP/1.0 PUT.
pub fn http_put(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<String> {
    http_request(
        addr,
        format!(
            "PUT {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// An unbound resolver serving `local-data` for the `test.` zone: the upstream.
pub struct Unbound {
    child: Option<Child>,
    /// Where it answers.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Unbound {
    /// Starts unbound with these extra `local-data` records (the `test.` zone
    /// has a SOA with a 300 s negative TTL).
    pub fn start(records: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  \
             pidfile: \"\"\n  directory: \"{d}\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  log-queries: yes\n  \
             verbosity: 0\n  do-ip6: no\n  local-zone: \"test.\" static\n  \
             local-data: \"test. 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 300\"\n",
            d = dir.path().display()
        );
        for r in records {
            conf.push_str(&format!("  local-data: \"{r}\"\n"));
        }
        std::fs::write(dir.path().join("unbound.conf"), conf).unwrap();
        let mut cmd = Command::new(require("unbound"));
        cmd.arg("-c")
            .arg(dir.path().join("unbound.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = die_with_parent(&mut cmd).spawn().expect("start unbound");
        let unbound = Unbound {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        unbound.wait_ready();
        unbound
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains("start of service") {
            assert!(Instant::now() < deadline, "unbound did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("unbound.log")).unwrap_or_default()
    }

    /// How many queries for `name` (`www.test.`) of `qtype` it has received, in
    /// any case (Wayfinder sends names in random case, 0x20).
    pub fn queries(&self, name: &str, qtype: &str) -> usize {
        let needle = format!(" {name} {qtype} IN").to_ascii_lowercase();
        self.log()
            .to_ascii_lowercase()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// Kills it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wayfinder's dns component running in this process on 127.0.0.1:<free port>.
pub struct Wayfinder {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    /// Counters and the zone-reload trigger.
    pub control: DnsControl,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Wayfinder {
    /// Starts the dns component from TOML text; the listen address is replaced
    /// by 127.0.0.1 on a [`free_port`] (not port 0: see there why a server's
    /// port must not come from the ephemeral range). Must be called inside a
    /// multi-thread tokio runtime.
    pub async fn start(toml: &str) -> Self {
        let env = std::collections::HashMap::<String, String>::new();
        let mut file = wayfinder::config::parse(toml, "test.toml", &env).expect("test config parses");
        file.dns.listen = vec![SocketAddr::from(([127, 0, 0, 1], free_port()))];
        if file.dns.workers == 0 {
            file.dns.workers = 2;
        }
        let config = wayfinder::config::validate(&file, "test.toml").expect("test config validates");
        let sockets = DnsSockets::bind(&config.dns.listen, config.dns.workers, None).expect("bind");
        let addr = sockets.local_addrs()[0];
        let control = DnsControl::default();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let control = control.clone();
            let shutdown = shutdown.clone();
            async move {
                let hub = wayfinder::consul::ConsulHub::new(config.consul.http, config.consul.resync, &shutdown);
                dns::run(&config.dns, &config.consul, sockets, control, hub.clone(), shutdown)
                    .await
                    .expect("dns runs");
                hub.close().await;
            }
        });
        Wayfinder {
            addr,
            control,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops it and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("dns stops within 5 s")
                .unwrap();
        }
    }
}

impl Drop for Wayfinder {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `[consul]` section pointing at `consul`.
pub fn consul_section(consul: &Consul) -> String {
    format!(
        "[consul]\nhttp = \"{}\"\ndns = [\"{}\"]\n",
        consul.http_addr(),
        consul.dns_addr()
    )
}

/// A loopback address no other test of this process uses (127.100.x.y).
pub fn unique_loopback() -> std::net::IpAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let [hi, lo] = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    std::net::IpAddr::from([127, 100, hi, lo])
}

/// A unique service name for this test (the shared agent is shared).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The output of one `dig` run.
#[derive(Debug, Clone)]
pub struct Dig {
    /// Everything dig printed.
    pub out: String,
    /// How long it took.
    pub took: Duration,
}

/// Runs real `dig @server -p port <args>` (one try, 3 s timeout unless overridden).
pub async fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let started = Instant::now();
    let output = tokio::process::Command::new(require("dig"))
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .await
        .expect("run dig");
    Dig {
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        took: started.elapsed(),
    }
}

impl Dig {
    /// The status word (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, `REFUSED` ...), or
    /// `TIMEOUT` when no answer came.
    pub fn status(&self) -> String {
        self.out
            .lines()
            .find_map(|l| l.split("status: ").nth(1))
            .map(|s| s.split(',').next().unwrap_or("").to_string())
            .unwrap_or_else(|| "TIMEOUT".to_string())
    }

    /// The header flags (`qr`, `aa`, `tc`, `rd`, `ra` ...).
    pub fn flags(&self) -> Vec<String> {
        self.out
            .lines()
            .find_map(|l| l.strip_prefix(";; flags: "))
            .map(|f| {
                f.split(';')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when the header has `flag`.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags().iter().any(|f| f == flag)
    }

    /// Records of a section (`ANSWER`, `AUTHORITY`, `ADDITIONAL`) as
    /// `(name, ttl, type, data)`.
    pub fn section(&self, name: &str) -> Vec<(String, u32, String, String)> {
        let header = format!(";; {name} SECTION:");
        let mut lines = self.out.lines().skip_while(|l| !l.starts_with(&header));
        lines.next();
        lines
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let owner = w.next()?.to_string();
                let ttl = w.next()?.parse().ok()?;
                let _class = w.next()?;
                let rtype = w.next()?.to_string();
                let data = w.collect::<Vec<_>>().join(" ");
                Some((owner, ttl, rtype, data))
            })
            .collect()
    }

    /// The data of the answer records, sorted.
    pub fn answers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.section("ANSWER").into_iter().map(|r| r.3).collect();
        v.sort();
        v
    }

    /// The message size dig reports (`MSG SIZE  rcvd: N`).
    pub fn size(&self) -> usize {
        self.out
            .lines()
            .find_map(|l| l.split("MSG SIZE  rcvd: ").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// `wayfinder <args>` (the built binary) in `dir` with a clean, known
/// environment: none of the variables Wayfinder reads inherited from the test
/// process (PanteraS's, `NOTIFY_SOCKET`), `RUST_LOG=info`, then `env`.
pub fn wayfinder_command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(wayfinder_bin());
    cmd.args(args).current_dir(dir).env("RUST_LOG", "info");
    for (var, _) in wayfinder::env::VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove("NOTIFY_SOCKET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// The wayfinder binary built for these tests.
pub fn wayfinder_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wayfinder"))
}

/// Waits until `f` is true or panics with `what` after `limit`.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, what: &str, mut f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real HTTP/1.1 backend on 127.0.0.1:<free port> answering every request with
/// its name, and echoing what the proxy sent in `x-seen-*` response headers.
/// Dropping it closes the listener and every connection (a killed instance).
pub struct HttpBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The name in every response body.
    pub name: String,
    /// When false, `/health` answers 503 (for active checks).
    pub healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted so far.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
}

impl HttpBackend {
    /// Starts a backend named `name`.
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let body_name = name.to_string();
        let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let health_flag = healthy.clone();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted_count = accepted.clone();
        tokio::spawn(async move {
            let conns = tokio_util::task::TaskTracker::new();
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                accepted_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let name = body_name.clone();
                let stop = stop.clone();
                let health_flag = health_flag.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let name = name.clone();
                        let healthy = health_flag.load(std::sync::atomic::Ordering::Relaxed);
                        async move {
                            if req.uri().path() == "/health" && !healthy {
                                let mut resp = http::Response::new(Answer::sized(bytes::Bytes::from("sick")));
                                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            let mut req = match special_answer(&name, req).await {
                                Ok(resp) => return Ok(resp),
                                Err(req) => req,
                            };
                            if req.headers().contains_key("upgrade") {
                                // An echo protocol after 101, standing in for WebSocket.
                                let upgrade = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(upgraded) = upgrade.await {
                                        let (mut r, mut w) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                let mut resp = http::Response::new(Answer::sized(bytes::Bytes::new()));
                                *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                                resp.headers_mut()
                                    .insert("connection", http::HeaderValue::from_static("upgrade"));
                                resp.headers_mut()
                                    .insert("upgrade", http::HeaderValue::from_static("echo"));
                                return Ok(resp);
                            }
                            let mut resp = http::Response::new(Answer::sized(bytes::Bytes::from(name)));
                            for (h, seen) in [
                                ("x-forwarded-for", "x-seen-xff"),
                                ("x-forwarded-proto", "x-seen-proto"),
                                ("x-unique-id", "x-seen-unique-id"),
                                ("host", "x-seen-host"),
                            ] {
                                if let Some(v) = req.headers().get(h) {
                                    resp.headers_mut().insert(seen, v.clone());
                                }
                            }
                            resp.headers_mut()
                                .insert("x-seen-path", http::HeaderValue::from_str(req.uri().path()).unwrap());
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        HttpBackend {
            addr,
            name: name.to_string(),
            healthy,
            accepted,
            shutdown,
        }
    }
}

/// The backend's answers with other kinds of body: `/empty` is 204, `/chunked`
/// sends `name` in three chunks of unknown length, and a POST is answered
/// with `<name> got <n>` once its `n`-byte body is read. Any other request is
/// handed back.
async fn special_answer(
    name: &str,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Answer>, http::Request<hyper::body::Incoming>> {
    use http_body_util::BodyExt;
    if req.method() == http::Method::POST {
        let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        return Ok(http::Response::new(Answer::sized(format!("{name} got {n}").into())));
    }
    match req.uri().path() {
        "/empty" => {
            let mut resp = http::Response::new(Answer::sized(bytes::Bytes::new()));
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            Ok(resp)
        }
        "/chunked" => {
            let third = name.len().div_ceil(3);
            let chunks = name.as_bytes().chunks(third.max(1));
            Ok(http::Response::new(Answer {
                frames: chunks.map(bytes::Bytes::copy_from_slice).collect(),
                sized: false,
            }))
        }
        _ => Err(req),
    }
}

/// A test backend's response body: its frames, and whether its length is
/// known (sent with Content-Length, else chunked).
pub struct Answer {
    frames: std::collections::VecDeque<bytes::Bytes>,
    sized: bool,
}

impl Answer {
    /// One frame of known length.
    pub fn sized(data: bytes::Bytes) -> Self {
        Self {
            frames: std::iter::once(data).filter(|d| !d.is_empty()).collect(),
            sized: true,
        }
    }
}

impl hyper::body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.frames.pop_front().map(|d| Ok(hyper::body::Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.sized {
            hyper::body::SizeHint::with_exact(self.frames.iter().map(|f| f.len() as u64).sum())
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Wayfinder's lb component running in this process on 127.0.0.1:<free port>.
pub struct Lb {
    /// The HTTP listener.
    pub addr: SocketAddr,
    /// The HTTPS listener, when the config turns HTTPS on.
    pub https: Option<SocketAddr>,
    /// The stats listener.
    pub stats: SocketAddr,
    /// Routing table, health and counters.
    pub state: std::sync::Arc<wayfinder::lb::LbState>,
    /// A keep-alive client for this test's runtime (clients must not outlive it).
    pub client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Lb {
    /// Starts the lb from TOML text (listener replaced by 127.0.0.1:0, or by
    /// port 0 on the loopback address the text gives: `haproxy_tcp` listeners
    /// open on that address, so a test that uses them gives one of its own,
    /// out of reach of the other tests' lbs that see the same shared Consul).
    pub async fn start(toml: &str) -> Self {
        init_logs();
        let env = std::collections::HashMap::<String, String>::new();
        let mut file = wayfinder::config::parse(toml, "test.toml", &env).expect("test config parses");
        let ip = match file.lb.http.ip() {
            ip if ip.is_loopback() => ip,
            _ => std::net::IpAddr::from([127, 0, 0, 1]),
        };
        file.lb.http = SocketAddr::new(ip, 0);
        file.lb.https = SocketAddr::from(([127, 0, 0, 1], 0));
        file.lb.stats = "127.0.0.1:0".into();
        if file.dns.upstreams.is_empty() {
            file.dns.upstreams = vec!["127.0.0.1:9".into()];
        }
        let config = wayfinder::config::validate(&file, "test.toml").expect("test config validates");
        let sockets = wayfinder::lb::LbSockets::bind(&config.lb).expect("bind lb");
        let addr = sockets.http.local_addr().unwrap();
        let https = sockets.https.as_ref().map(|l| l.local_addr().unwrap());
        let stats = sockets
            .stats
            .as_ref()
            .map(|l| l.local_addr().unwrap())
            .expect("stats listener");
        let appliance = wayfinder::component::Appliance::new(&config.consul, None, config.own_listeners());
        let inputs = wayfinder::lb::Inputs::new(&config.consul, &appliance);
        let state = wayfinder::lb::LbState::new(&wayfinder::lb::table_config(&config.lb, &inputs));
        let shutdown = CancellationToken::new();
        tokio::spawn({
            let state = state.clone();
            let shutdown = shutdown.clone();
            async move {
                wayfinder::lb::run(&config.lb, &inputs, sockets, state, appliance.consul.clone(), shutdown)
                    .await
                    .expect("lb runs");
                appliance.close().await;
            }
        });
        Lb {
            addr,
            https,
            stats,
            state,
            client: http_client(),
            shutdown,
        }
    }

    /// Stops it (clean shutdown: deregistration included) and waits a moment.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// GET `path` with `Host: host`: (status, body, response headers).
    pub async fn get(&self, host: &str, path: &str) -> (u16, String, http::HeaderMap) {
        get_with(&self.client, self.addr, host, path).await
    }

    /// Waits until `host` answers with a body from one of `names` (routes are live).
    pub async fn wait_for(&self, host: &str, path: &str, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body, _) = self.get(host, path).await;
            if status == 200 && names.contains(&body.as_str()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{host}{path}: still {status} {body:?}, wanted one of {names:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A GET with `Host: host` through `client`: (status, body, headers).
pub async fn get_with(
    client: &reqwest::Client,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> (u16, String, http::HeaderMap) {
    let resp = client
        .get(format!("http://{addr}{path}"))
        .header("Host", host)
        .send()
        .await
        .expect("lb answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.text().await.unwrap_or_default(), headers)
}

/// GETs `/` through the lb at `addr` with `Host: host` until it answers 200
/// (within `limit`); returns that body. On timeout the test fails with the last
/// answer and `context()` (the routing table, a log ...).
pub async fn wait_routed(
    client: &reqwest::Client,
    addr: SocketAddr,
    host: &str,
    limit: Duration,
    context: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let last = match client.get(format!("http://{addr}/")).header("Host", host).send().await {
            Ok(resp) if resp.status() == 200 => return resp.text().await.unwrap_or_default(),
            Ok(resp) => format!("{} {}", resp.status(), resp.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "the lb never routed {host} in {limit:?} (last: {last})\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new keep-alive client (one per test runtime).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// Runs `dig @server <args>` until `done` holds for its answer, panicking with
/// `what` and the last answer after `limit`. Returns the answer that passed.
pub async fn dig_until(
    server: SocketAddr,
    args: &[&str],
    limit: Duration,
    what: &str,
    done: impl Fn(&Dig) -> bool,
) -> Dig {
    let deadline = Instant::now() + limit;
    loop {
        let d = dig(server, args).await;
        if done(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}\n{}",
            d.out
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real nginx (Debian's `nginx-light`) serving its name at every path and
/// `ok` at `/health`, on 127.0.0.1:<free port>; one process, no daemon.
pub struct Nginx {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx answering `name`, and waits until it accepts connections.
    pub fn start(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 keepalive_requests 100000;\n\
                 server {{\n    listen {addr} reuseport;\n    location = /health {{ return 200 \"ok\"; }}\n\
                 location / {{ add_header X-Seen-Proto $http_x_forwarded_proto; return 200 \"{name}\"; }}\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let mut nginx = Nginx { addr, child: None, dir };
        nginx.launch();
        nginx
    }

    fn launch(&mut self) {
        let mut cmd = Command::new(require("nginx"));
        cmd.args(["-p", &self.dir.path().display().to_string(), "-c", "nginx.conf"])
            .args(["-e", &format!("{}/error.log", self.dir.path().display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(die_with_parent(&mut cmd).spawn().expect("start nginx"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}; error.log:\n{}",
                self.addr,
                std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it outright (SIGKILL: no goodbye to open connections).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `wayfinder up`'s supervisor running in this test.
pub struct Up {
    /// The supervisor's state.
    pub state: Arc<SupervisorState>,
    /// The admin endpoint.
    pub admin: SocketAddr,
    /// The dns listener, when dns runs.
    pub dns: Option<SocketAddr>,
    /// The lb's HTTP listener, when the lb runs.
    pub lb: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Up {
    /// Starts the supervisor from TOML text and role variables. The admin
    /// endpoint goes on 127.0.0.1:0 (unless the text sets it); dns and lb use
    /// whatever addresses the text gives.
    pub async fn start(toml: &str, vars: &[(&str, &str)]) -> Self {
        Self::try_start(toml, vars)
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"))
    }

    /// [`Self::start`] for text whose ports `make` picks with `free_port`: a
    /// port a parallel test took since it was seen free means new ports.
    pub async fn start_on_free_ports(make: impl Fn() -> String, vars: &[(&str, &str)]) -> Self {
        for _ in 0..4 {
            match Self::try_start(&make(), vars).await {
                Ok(up) => return up,
                Err(e) if e.to_string().contains("in use") => continue,
                Err(e) => panic!("bind: {e}"),
            }
        }
        panic!("no free ports in 4 tries");
    }

    pub async fn try_start(toml: &str, vars: &[(&str, &str)]) -> Result<Self, wayfinder::supervisor::SupervisorError> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut file = wayfinder::config::parse(toml, "test.toml", &env).expect("test config parses");
        if file.supervisor.admin == "127.0.0.1:9000" {
            file.supervisor.admin = "127.0.0.1:0".into();
        }
        if file.dns.upstreams.is_empty() {
            file.dns.upstreams = vec!["127.0.0.1:9".into()];
        }
        let config = wayfinder::config::validate(&file, "test.toml").expect("test config validates");
        let plan = wayfinder::supervisor::roles::plan(&env, &config).expect("role plan");
        let (appliance, components) = wayfinder::components::assemble(&config);
        let up = UpConfig::of(&config);
        let sockets = UpSockets::bind(&up, &plan, &components, &appliance)?;
        let admin = sockets.admin_addr().expect("admin endpoint on");
        let dns = sockets.listening("dns").first().copied();
        let lb = sockets.listening("lb_http").first().copied();
        let state = SupervisorState::new(up, plan, components, appliance, false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (state, shutdown) = (state.clone(), shutdown.clone());
            async move {
                wayfinder::supervisor::run(sockets, state, shutdown)
                    .await
                    .expect("supervisor runs")
            }
        });
        Ok(Up {
            state,
            admin,
            dns,
            lb,
            shutdown,
            task: Some(task),
        })
    }

    pub fn unit(&self, name: &str) -> UnitInfo {
        self.state.unit(name).expect("unit exists").snapshot()
    }

    /// Waits until unit `name` satisfies `f`.
    pub async fn wait_unit(&self, name: &str, limit: Duration, what: &str, f: impl Fn(&UnitInfo) -> bool) -> UnitInfo {
        let deadline = Instant::now() + limit;
        loop {
            let u = self.unit(name);
            if f(&u) {
                return u;
            }
            assert!(Instant::now() < deadline, "{name}: {what}; now {u:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops everything and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("supervisor stops within 20 s")
                .unwrap();
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HTTP backend answering `answer`, registered in `consul` as instance
/// `<svc>-1` of a new service `<prefix>...` tagged `haproxy` (TTL check,
/// passing): (service name, backend).
pub async fn tagged_backend(consul: &Consul, prefix: &str, answer: &str) -> (String, HttpBackend) {
    let backend = HttpBackend::start(answer).await;
    (register_tagged(consul, prefix, backend.addr.port()), backend)
}

/// Registers instance `<svc>-1` of a new service `<prefix>...` at
/// 127.0.0.1:`port`, tagged `haproxy`, with a passing TTL check: its name.
pub fn register_tagged(consul: &Consul, prefix: &str, port: u16) -> String {
    let svc = unique(prefix);
    consul.register(&format!("{svc}-1"), &svc, "127.0.0.1", port, &["haproxy"], true);
    svc
}

/// `wayfinder <args>` (the built binary) with its own directory and log, killed
/// with its process group when dropped (or when the test process dies).
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `wayfinder <args>` in `dir`, its output in `dir/<args[0]>.log`.
    pub fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{}.log", args[0]));
        let mut cmd = wayfinder_command(dir, args, env);
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let child = die_with_parent(&mut cmd).spawn().expect("start wayfinder");
        Self {
            child: Some(child),
            log,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (60 s at most) until its log holds `want`; fails if it exits first.
    pub fn wait_log(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().contains(want) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("wayfinder exited ({status}) before `{want}`:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no `{want}` in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as an OOM killer or a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}
