//! The vpn against real peers in network namespaces: wireguard-go is the laptop
//! (configured from the client file `wayfinder vpn peer add` prints), the built
//! binary runs `wayfinder vpn` (and `wayfinder dns` with a Consul agent) in the
//! appliance namespace, nginx stands for the container network in a third one.
//! A boringtun `Tunn` in the test process plays a second, scriptable peer for
//! the hostile cases (spoofed sources, garbage, floods, removed keys).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::harness::{http_put, require, wayfinder_bin};
use crate::netns::{Netns, WireguardGo, link, run, unique};

const SERVER: &str = "10.200.0.1";
const CONTAINER: &str = "172.31.0.2";

/// A laptop namespace joined to the appliance by its own veth (10.250.<n>.0/24).
struct Laptop {
    ns: Netns,
    /// The laptop's address on the "internet".
    addr: Ipv4Addr,
}

/// The appliance namespace with `wayfinder vpn`, its config and state dir.
struct Lab {
    app: Netns,
    containers: Netns,
    dir: tempfile::TempDir,
    config: PathBuf,
    interface: String,
    laptops: usize,
    /// The running `wayfinder vpn`, once started.
    vpn_pid: Option<u32>,
}

impl Lab {
    /// Namespaces, links and the config; nothing runs yet. `extra` is appended
    /// to the `[vpn]` section.
    fn new(extra: &str) -> Self {
        let app = Netns::new();
        let containers = Netns::new();
        link(&app, "ctr0", "172.31.0.1/24", &containers, "eth0", "172.31.0.2/24");
        containers.ip("route add default via 172.31.0.1");
        let dir = tempfile::tempdir().unwrap();
        let interface = unique("wfs");
        let config = dir.path().join("wayfinder.toml");
        std::fs::write(
            &config,
            format!(
                "[consul]\nhttp = \"127.0.0.1:8500\"\ndns = [\"127.0.0.1:8600\"]\n\
                 [dns]\nlisten = [\"127.0.0.1:53\"]\nupstreams = [\"127.0.0.1:9\"]\nzones_dir = \"{d}/zones\"\n\
                 [lb]\nstats = \"\"\n\
                 [vpn]\nenabled = true\ninterface = \"{interface}\"\ndir = \"{d}/vpn\"\n\
                 endpoint = \"10.250.0.1:51820\"\nroutes = [\"172.31.0.0/24\"]\n{extra}\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        Lab {
            app,
            containers,
            dir,
            config,
            interface,
            laptops: 0,
            vpn_pid: None,
        }
    }

    /// `wayfinder <args> -c <config>` in the host namespace (files only).
    fn wayfinder(&self, args: &[&str]) -> Output {
        Command::new(wayfinder_bin())
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .env_remove("HOST_IP")
            .env_remove("LISTEN_IP")
            .output()
            .expect("run wayfinder")
    }

    /// Adds a peer; returns its client config.
    fn add_peer(&self, name: &str) -> String {
        let out = self.wayfinder(&["vpn", "peer", "add", name]);
        assert!(
            out.status.success(),
            "peer add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts `wayfinder vpn` in the appliance and waits for its control socket
    /// and its "listening" line (logged once the firewall table is in place).
    fn start_vpn(&mut self) {
        let mut cmd = self.app.cmd(wayfinder_bin().to_str().unwrap());
        cmd.args(["vpn", "-c"]).arg(&self.config).env("RUST_LOG", "info");
        let log = self.dir.path().join("vpn.log");
        self.vpn_pid = Some(self.app.spawn(cmd, &log));
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.interface));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() || !self.vpn_log().contains("vpn listening") {
            assert!(
                Instant::now() < deadline,
                "wayfinder vpn did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the vpn; waits until it says it stopped.
    fn stop_vpn(&mut self) {
        let pid = self.vpn_pid.take().expect("the vpn runs");
        // SAFETY: kill(2) on the `wayfinder vpn` this test started (`ip netns
        // exec` execs it, so the pid is the vpn's).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.vpn_log().contains("vpn stopped") {
            assert!(Instant::now() < deadline, "the vpn did not stop:\n{}", self.vpn_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The vpn's nft table in the appliance namespace.
    fn table(&self) -> String {
        wayfinder::vpn::forward::table_name(&self.interface)
    }

    /// `nft <args>` in the appliance namespace: its stdout; fails the test when
    /// nft fails.
    fn nft(&self, args: &[&str]) -> String {
        let out = self.app.output(require("nft").to_str().unwrap(), args);
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A second network behind the appliance (`oth0`, 172.30.0.0/24, not in
    /// `vpn.routes`) with one host, 172.30.0.2, routed back through the appliance.
    fn other_network(&self) -> Netns {
        let other = Netns::new();
        link(&self.app, "oth0", "172.30.0.1/24", &other, "eth0", "172.30.0.2/24");
        other.ip("route add default via 172.30.0.1");
        other
    }

    fn vpn_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vpn.log")).unwrap_or_default()
    }

    /// A new laptop namespace linked to the appliance.
    fn laptop(&mut self) -> Laptop {
        let n = self.laptops;
        self.laptops += 1;
        let ns = Netns::new();
        link(
            &self.app,
            &format!("wan{n}"),
            &format!("10.250.{n}.1/24"),
            &ns,
            "wan",
            &format!("10.250.{n}.2/24"),
        );
        // Every laptop reaches the server's endpoint address through its link.
        if n > 0 {
            ns.ip(&format!("route add 10.250.0.1/32 via 10.250.{n}.1"));
        }
        Laptop {
            ns,
            addr: Ipv4Addr::new(10, 250, n as u8, 2),
        }
    }

    /// A laptop running wireguard-go configured from a fresh `peer add`.
    fn wireguard_laptop(&mut self, name: &str) -> (Laptop, WireguardGo) {
        let conf = self.add_peer(name);
        let mut laptop = self.laptop();
        let wg = WireguardGo::start(&mut laptop.ns);
        wg.configure(&laptop.ns, &conf);
        (laptop, wg)
    }

    /// Packets the appliance's TUN received from the vpn (what passed every check).
    fn delivered(&self) -> u64 {
        self.app.counter(&self.interface, "rx_packets")
    }
}

/// `ping -c <count>` from the laptop; true when every reply came.
fn ping(laptop: &Laptop, target: &str, count: u32) -> bool {
    require("ping");
    let out = laptop
        .ns
        .output("ping", &["-c", &count.to_string(), "-i", "0.05", "-W", "2", target]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss")
}

/// Pings until one gets through (the first handshake), or fails the test.
fn wait_ping(laptop: &Laptop, target: &str, lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(laptop, target, 1) {
        assert!(
            Instant::now() < deadline,
            "no ping through the tunnel to {target}; vpn log:\n{}",
            lab.vpn_log()
        );
    }
}

/// A scriptable WireGuard peer: a boringtun `Tunn` and a UDP socket in a laptop
/// namespace.
struct TestPeer {
    tunn: Tunn,
    socket: UdpSocket,
    server: SocketAddr,
    address: Ipv4Addr,
}

impl TestPeer {
    /// A peer for the client config `conf` (its private key and address), with a
    /// socket bound in `laptop` on `bind`.
    fn new(conf: &str, laptop: &Laptop, bind: Ipv4Addr) -> Self {
        let value = |key: &str| {
            conf.lines()
                .find_map(|l| {
                    l.split_once(" = ")
                        .filter(|(k, _)| *k == key)
                        .map(|(_, v)| v.to_string())
                })
                .unwrap()
        };
        let secret = StaticSecret::from(key(&value("PrivateKey")));
        let server_key = PublicKey::from(key(&value("PublicKey")));
        let address = value("Address").trim_end_matches("/32").parse().unwrap();
        let socket = laptop.ns.enter(|| UdpSocket::bind((bind, 0)).unwrap());
        socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        TestPeer {
            tunn: Tunn::new(secret, server_key, None, None, rand::random::<u32>() >> 8, None),
            socket,
            server: "10.250.0.1:51820".parse().unwrap(),
            address,
        }
    }

    /// Completes a handshake with the server; false when none completes.
    fn handshake(&mut self) -> bool {
        let mut buf = vec![0u8; 65_535 + 32];
        for _ in 0..5 {
            if let TunnResult::WriteToNetwork(init) = self.tunn.format_handshake_initiation(&mut buf, true) {
                self.socket.send_to(init, self.server).unwrap();
            }
            let mut rx = [0u8; 2048];
            let Ok((n, _)) = self.socket.recv_from(&mut rx) else {
                continue;
            };
            if let TunnResult::WriteToNetwork(keepalive) = self.tunn.decapsulate(None, &rx[..n], &mut buf) {
                self.socket.send_to(keepalive, self.server).unwrap();
                return true;
            }
        }
        false
    }

    /// Sends an ICMP echo request from `src` to `dst` through the tunnel.
    fn send_ping(&mut self, src: Ipv4Addr, dst: Ipv4Addr, seq: u16) {
        let packet = icmp_echo(src, dst, seq);
        let mut buf = vec![0u8; 65_535 + 32];
        if let TunnResult::WriteToNetwork(data) = self.tunn.encapsulate(&packet, &mut buf) {
            self.socket.send_to(data, self.server).unwrap();
        }
    }

    /// Waits (up to ~1 s) for an ICMP echo reply with `seq` through the tunnel.
    fn got_reply(&mut self, seq: u16) -> bool {
        let mut buf = vec![0u8; 65_535 + 32];
        let mut rx = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let Ok((n, _)) = self.socket.recv_from(&mut rx) else {
                continue;
            };
            if let TunnResult::WriteToTunnelV4(p, _) = self.tunn.decapsulate(None, &rx[..n], &mut buf)
                && p.len() >= 28
                && p[20] == 0
                && u16::from_be_bytes([p[26], p[27]]) == seq
            {
                return true;
            }
        }
        false
    }

    /// Sends one raw datagram to the server.
    fn raw(&self, data: &[u8]) {
        let _ = self.socket.send_to(data, self.server);
    }
}

fn key(b64: &str) -> [u8; 32] {
    wayfinder::vpn::keys::from_base64(b64).expect("a base64 key")
}

/// An IPv4 ICMP echo request with correct checksums.
fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    fn checksum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
    let mut p = vec![0u8; 28 + 16];
    let total = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&0x4242u16.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    let icmp_sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
    p
}

/// Handshake and ping; `wg show` against the control socket reports the right
/// public key and a real handshake time; `peer list` shows the live figures;
/// HTTP from the laptop to nginx in the container network (forwarded by the
/// appliance's kernel, replies routed back to the right peer).
#[test]
fn laptop_handshakes_pings_and_reaches_the_container_network() {
    require("nginx");
    require("curl");
    let mut lab = Lab::new("");
    lab.start_vpn();
    let (laptop, _wg) = lab.wireguard_laptop("laptop");
    wait_ping(&laptop, SERVER, &lab);
    assert!(ping(&laptop, SERVER, 5), "pings through the tunnel are lost");

    let show = run(Command::new("wg").args(["show", &lab.interface]));
    let show = String::from_utf8_lossy(&show.stdout);
    let server_key = String::from_utf8_lossy(&lab.wayfinder(&["vpn", "peer", "list"]).stdout).to_string();
    let peers = std::fs::read_to_string(lab.dir.path().join("vpn/peers.toml")).unwrap();
    let laptop_key = peers
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \""))
        .map(|k| k.trim_end_matches('"').to_string())
        .unwrap();
    assert!(show.contains(&format!("peer: {laptop_key}")), "{show}");
    assert!(show.contains("latest handshake:"), "{show}");
    assert!(
        !show.contains("years"),
        "handshake time must be Unix time, not an age:\n{show}"
    );
    assert!(show.contains("endpoint: 10.250.0.2:"), "{show}");
    let public = String::from_utf8_lossy(&run(Command::new("wg").args(["show", &lab.interface, "public-key"])).stdout)
        .trim()
        .to_string();
    let conf_key = std::fs::read_to_string(lab.dir.path().join("vpn/server.key")).unwrap();
    let expected = wayfinder::vpn::keys::to_base64(&PublicKey::from(&StaticSecret::from(key(&conf_key))).to_bytes());
    assert_eq!(public, expected, "wg show reports the server's public key");
    assert!(
        server_key.contains("laptop") && server_key.contains(" s ago"),
        "{server_key}"
    );

    // The container network: nginx in its own namespace, through the tunnel.
    container_web(&mut lab, "\"container-web\"");
    assert_eq!(laptop_get(&laptop, "container-web"), "container-web");
}

/// Starts nginx in the container namespace on CONTAINER:8080 answering `body`
/// (an nginx string expression).
fn container_web(lab: &mut Lab, body: &str) {
    let web = lab.dir.path().join("nginx");
    std::fs::create_dir_all(&web).unwrap();
    let d = web.display();
    std::fs::write(
        web.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 64; }}\nhttp {{\n access_log off;\n client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n server {{\n  listen {CONTAINER}:8080;\n  location / {{ return 200 {body}; }}\n }}\n}}\n"
        ),
    )
    .unwrap();
    let mut nginx = lab.containers.cmd("nginx");
    nginx.args(["-p", &d.to_string(), "-c", "nginx.conf"]);
    lab.containers.spawn(nginx, &web.join("stdout.log"));
}

/// GETs the container web server from the laptop until an answer starting with
/// `expect` comes (10 s at most); returns it.
fn laptop_get(laptop: &Laptop, expect: &str) -> String {
    let url = format!("http://{CONTAINER}:8080/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = laptop.ns.output("curl", &["-s", "--max-time", "2", &url]);
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        if body.starts_with(expect) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no HTTP answer from the container network through the tunnel (last: {body:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A peer reaches only what it was given (the tunnel address and `vpn.routes`),
/// whatever its own config says: a wireguard-go laptop that adds a second
/// network behind the appliance (routed by the appliance's kernel, not in
/// `vpn.routes`) to its AllowedIPs and routes gets nothing from a host there,
/// nor from the appliance's own address on it, while the container network
/// keeps answering; a second peer does not reach the laptop. An accept put in
/// front of the vpn's rules by hand lets the same pings through, so it is the
/// rules that refuse them. A table left by a
/// crashed run (one that drops all tunnel traffic) is replaced at start, and the
/// table is gone after stop.
#[test]
fn a_peer_reaches_only_the_tunnel_address_and_routes() {
    require("nft");
    let mut lab = Lab::new("");
    let _other = lab.other_network();
    let table = lab.table();
    let tun = lab.interface.clone();
    let stale = format!(
        "table inet {table} {{\n chain stale {{ type filter hook forward priority filter; policy accept; \
         iifname \"{tun}\" drop; }}\n chain stale_in {{ type filter hook input priority filter; policy accept; \
         iifname \"{tun}\" drop; }}\n}}\n"
    );
    let mut nft = lab.app.cmd(require("nft").to_str().unwrap());
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stale.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "could not plant the stale table");

    lab.start_vpn();
    let ruleset = lab.nft(&["list", "table", "inet", &table]);
    assert!(
        !ruleset.contains("stale"),
        "the crashed run's table is still there:\n{ruleset}"
    );
    assert!(ruleset.contains("172.31.0.0/24"), "{ruleset}");
    let (laptop, wg) = lab.wireguard_laptop("laptop");
    wait_ping(&laptop, SERVER, &lab);
    // Reached at all (a retry, not a loss count: under a loaded machine a
    // single reply may take longer than ping's 2 s wait).
    wait_ping(&laptop, CONTAINER, &lab);

    // The laptop widens its own config to the other network.
    let server_key = {
        let k = std::fs::read_to_string(lab.dir.path().join("vpn/server.key")).unwrap();
        wayfinder::vpn::keys::to_base64(&PublicKey::from(&StaticSecret::from(key(&k))).to_bytes())
    };
    run(Command::new("wg").args([
        "set",
        &wg.interface,
        "peer",
        &server_key,
        "allowed-ips",
        "10.200.0.0/24,172.31.0.0/24,172.30.0.0/24",
    ]));
    laptop.ns.ip(&format!("route add 172.30.0.0/24 dev {}", wg.interface));
    assert!(
        lab.app
            .output("ping", &["-c", "1", "-W", "2", "172.30.0.2"])
            .status
            .success(),
        "the other network is not up"
    );
    assert!(
        !ping(&laptop, "172.30.0.2", 2),
        "a peer reached a network outside vpn.routes"
    );
    assert!(
        !ping(&laptop, "172.30.0.1", 2),
        "a peer reached a host address outside vpn.routes"
    );
    // The routes still work.
    wait_ping(&laptop, CONTAINER, &lab);
    let dropped = |chain: &str| -> u64 {
        let text = lab.nft(&["list", "chain", "inet", &table, chain]);
        text.split("counter packets ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in:\n{text}"))
    };
    assert!(dropped("forward") >= 2, "forward drops not counted");
    assert!(dropped("input") >= 2, "input drops not counted");

    // Nor does one peer reach another (a scripted second peer pings the laptop).
    let second_conf = lab.add_peer("second");
    let wan = lab.laptop();
    let mut second = TestPeer::new(&second_conf, &wan, wan.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.handshake() {
        assert!(
            Instant::now() < deadline,
            "no handshake for the second peer:\n{}",
            lab.vpn_log()
        );
    }
    second.send_ping(second.address, SERVER.parse().unwrap(), 1);
    assert!(second.got_reply(1), "the second peer does not reach the tunnel address");
    let laptop_address: Ipv4Addr = "10.200.0.2".parse().unwrap();
    second.send_ping(second.address, laptop_address, 2);
    assert!(!second.got_reply(2), "a peer reached another peer");

    // Control: with an accept in front of the drop the same pings get through.
    lab.nft(&["insert", "rule", "inet", &table, "forward", "iifname", &tun, "accept"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(&laptop, "172.30.0.2", 1) {
        assert!(
            Instant::now() < deadline,
            "the other network is unreachable even without the rules"
        );
    }
    let mut seq = 3;
    loop {
        second.send_ping(second.address, laptop_address, seq);
        if second.got_reply(seq) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the peers cannot reach each other even without the rules"
        );
        seq += 1;
    }

    lab.stop_vpn();
    let tables = lab.nft(&["list", "tables"]);
    assert!(
        !tables.contains("wayfinder_vpn"),
        "the vpn's table outlived it:\n{tables}"
    );
}

/// `masquerade = true`: a container network with no route back to the tunnel
/// subnet still answers the laptop, and sees the appliance's address as the
/// client instead of the laptop's tunnel address.
#[test]
fn masquerade_reaches_networks_without_a_route_back() {
    require("nginx");
    require("curl");
    require("nft");
    let mut lab = Lab::new("masquerade = true");
    lab.containers.ip("route del default");
    lab.start_vpn();
    let (laptop, _wg) = lab.wireguard_laptop("laptop");
    wait_ping(&laptop, SERVER, &lab);
    container_web(&mut lab, "\"client=$remote_addr\"");
    assert_eq!(laptop_get(&laptop, "client="), "client=172.31.0.1");
}

/// `dig @<tunnel address> web.service.consul SRV` from the laptop: the dns
/// answers on the tunnel address (added to its listeners because the vpn is
/// enabled, bound before the interface exists) with Consul's records; any
/// other name is answered through the upstream resolvers (an unbound in the
/// appliance namespace), so the laptop keeps working for every name.
#[test]
fn laptop_resolves_consul_services_through_the_tunnel() {
    require("consul");
    require("dig");
    require("unbound");
    let mut lab = Lab::new("");
    let unbound_conf = lab.dir.path().join("unbound.conf");
    std::fs::write(
        &unbound_conf,
        format!(
            "server:\n  interface: 127.0.0.1@5353\n  port: 5353\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  \
             pidfile: \"\"\n  directory: \"{d}\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  do-ip6: no\n  \
             local-zone: \"example.test.\" static\n  local-data: \"www.example.test. 300 IN A 192.0.2.80\"\n",
            d = lab.dir.path().display()
        ),
    )
    .unwrap();
    let mut unbound = lab.app.cmd("unbound");
    unbound.arg("-c").arg(&unbound_conf);
    lab.app.spawn(unbound, &lab.dir.path().join("unbound.out"));
    let config = std::fs::read_to_string(&lab.config).unwrap();
    std::fs::write(&lab.config, config.replace("127.0.0.1:9", "127.0.0.1:5353")).unwrap();
    // The dns first: its tunnel-address socket is bound before the TUN exists.
    let mut consul = lab.app.cmd("consul");
    consul
        .args([
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-node",
            "appliance",
        ])
        .args(["-hcl", "dns_config { enable_truncate = true }"]);
    let consul_log = lab.dir.path().join("consul.log");
    lab.app.spawn(consul, &consul_log);
    let mut dns = lab.app.cmd(wayfinder_bin().to_str().unwrap());
    dns.args(["dns", "-c"]).arg(&lab.config).env("RUST_LOG", "info");
    let dns_log = lab.dir.path().join("dns.log");
    lab.app.spawn(dns, &dns_log);
    lab.start_vpn();
    let consul_http: SocketAddr = "127.0.0.1:8500".parse().unwrap();
    lab.app.enter(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_put(
            consul_http,
            "/v1/agent/service/register",
            r#"{"ID":"web1","Name":"web","Address":"172.31.0.2","Port":8080}"#,
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "consul did not start:\n{}",
                std::fs::read_to_string(&consul_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (laptop, _wg) = lab.wireguard_laptop("laptop");
    wait_ping(&laptop, SERVER, &lab);
    let dns_log_text = || format!("dns log:\n{}", std::fs::read_to_string(&dns_log).unwrap_or_default());
    laptop.ns.wait_for_srv(
        SERVER,
        "web.service.consul",
        8080,
        Duration::from_secs(20),
        dns_log_text,
    );
    assert_eq!(
        laptop.ns.dig_short(SERVER, &["www.example.test", "A"], 3),
        "192.0.2.80",
        "a non-Consul name through the tunnel goes to the upstreams; {}",
        dns_log_text()
    );
}

/// Peers change live: a second peer added while the first pings continuously
/// (no reply of the first is lost), then removed: it can no longer send, and
/// the first keeps working.
#[test]
fn peers_are_added_and_removed_without_disturbing_others() {
    let mut lab = Lab::new("");
    lab.start_vpn();
    let (first, _wg) = lab.wireguard_laptop("first");
    wait_ping(&first, SERVER, &lab);
    let mut busy = first.ns.cmd("ping");
    busy.args(["-c", "60", "-i", "0.05", "-W", "2", SERVER]);
    let busy = busy.output_in_background();

    let conf = lab.add_peer("second");
    let second_laptop = lab.laptop();
    let mut second = TestPeer::new(&conf, &second_laptop, second_laptop.addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !second.handshake() {
        assert!(
            Instant::now() < deadline,
            "the new peer was not applied live:\n{}",
            lab.vpn_log()
        );
    }
    second.send_ping(second.address, SERVER.parse().unwrap(), 1);
    assert!(second.got_reply(1), "the new peer gets no reply");

    let out = busy.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "the first peer lost packets while the second was added:\n{text}"
    );

    let out = lab.wayfinder(&["vpn", "peer", "remove", "second"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(1500));
    let before = lab.delivered();
    assert!(before > 0, "the TUN counter saw the earlier pings");
    for seq in 2..5 {
        second.send_ping(second.address, SERVER.parse().unwrap(), seq);
        assert!(!second.got_reply(seq), "a removed peer still gets answers");
    }
    assert!(!second.handshake(), "a removed peer can still handshake");
    assert_eq!(lab.delivered(), before, "packets of a removed peer reached the TUN");
    // The first peer still works.
    wait_ping(&first, SERVER, &lab);
}

/// No peer can speak for another: a packet whose inner source is another peer's
/// address (or outside every peer's networks) is dropped; its own source passes.
#[test]
fn spoofed_inner_sources_are_dropped() {
    let mut lab = Lab::new("");
    let victim_conf = lab.add_peer("victim");
    let conf = lab.add_peer("mallory");
    lab.start_vpn();
    let laptop = lab.laptop();
    let mut mallory = TestPeer::new(&conf, &laptop, laptop.addr);
    assert!(mallory.handshake(), "handshake failed:\n{}", lab.vpn_log());
    mallory.send_ping(mallory.address, SERVER.parse().unwrap(), 1);
    assert!(mallory.got_reply(1), "own source gets no reply");
    let victim: Ipv4Addr = victim_conf
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    let before = lab.delivered();
    assert!(before > 0, "the TUN counter saw the legitimate ping");
    for (seq, src) in [
        (2, victim),
        (3, Ipv4Addr::new(192, 0, 2, 9)),
        (4, Ipv4Addr::new(10, 200, 0, 200)),
    ] {
        mallory.send_ping(src, SERVER.parse().unwrap(), seq);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lab.delivered(), before, "a spoofed inner source reached the TUN");
    mallory.send_ping(mallory.address, SERVER.parse().unwrap(), 5);
    assert!(mallory.got_reply(5), "the peer itself still works");
}

/// Garbage, short and oversized datagrams, and unauthenticated messages of every
/// type, get no answer and hurt nothing: a real handshake and ping work after.
#[test]
fn garbage_short_and_oversized_datagrams_are_ignored() {
    let mut lab = Lab::new("");
    let conf = lab.add_peer("peer");
    lab.start_vpn();
    let laptop = lab.laptop();
    let mut peer = TestPeer::new(&conf, &laptop, laptop.addr);
    let mut junk: Vec<Vec<u8>> = vec![vec![], vec![1], vec![1, 0, 0], vec![4, 0, 0, 0], vec![0xff; 31]];
    for (kind, len) in [
        (1u8, 148usize),
        (2, 92),
        (3, 64),
        (4, 32),
        (4, 1500),
        (1, 149),
        (9, 200),
    ] {
        for _ in 0..20 {
            let mut d: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            d[0] = kind;
            d[1..4].fill(0);
            junk.push(d);
        }
    }
    junk.push(vec![0x04; 8000]);
    junk.push(vec![0x04; 65_000]);
    for d in &junk {
        peer.raw(d);
    }
    let mut rx = [0u8; 2048];
    assert!(peer.socket.recv_from(&mut rx).is_err(), "the server answered garbage");
    assert!(peer.handshake(), "no handshake after the garbage:\n{}", lab.vpn_log());
    peer.send_ping(peer.address, SERVER.parse().unwrap(), 7);
    assert!(peer.got_reply(7), "no ping after the garbage");
    assert!(!lab.vpn_log().contains("panicked"), "{}", lab.vpn_log());
}

/// A handshake flood from many source addresses, with valid and with random
/// mac1: the server answers valid ones with cookie replies once over the limit
/// (so it does not spend a DH on each), never answers bad ones, and the real
/// peer keeps pinging throughout.
#[test]
fn handshake_flood_gets_cookies_while_a_real_peer_keeps_working() {
    let mut lab = Lab::new("");
    lab.start_vpn();
    let (real, _wg) = lab.wireguard_laptop("real");
    wait_ping(&real, SERVER, &lab);
    let mut ping = real.ns.cmd("ping");
    ping.args(["-c", "40", "-i", "0.05", "-W", "2", SERVER]);
    let ping = ping.output_in_background();

    let attacker = lab.laptop();
    let server_key = {
        let k = std::fs::read_to_string(lab.dir.path().join("vpn/server.key")).unwrap();
        PublicKey::from(&StaticSecret::from(key(&k)))
    };
    let sources: Vec<UdpSocket> = (10..30)
        .map(|i| {
            attacker.ns.ip(&format!("addr add 10.250.{}.{i}/24 dev wan", 1));
            let addr = Ipv4Addr::new(10, 250, 1, i);
            let s = attacker.ns.enter(|| UdpSocket::bind((addr, 0)).unwrap());
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let server: SocketAddr = "10.250.0.1:51820".parse().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut cookies = 0;
    let mut other_answers = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        for s in &sources {
            // A stranger with a valid mac1 (it knows the public key) ...
            let mut t = Tunn::new(
                StaticSecret::from(rand::random::<[u8; 32]>()),
                server_key,
                None,
                None,
                rand::random::<u32>() >> 8,
                None,
            );
            if let TunnResult::WriteToNetwork(init) = t.format_handshake_initiation(&mut buf, true) {
                let _ = s.send_to(init, server);
            }
            // ... and one with a random mac1.
            let mut bad: Vec<u8> = (0..148).map(|_| rand::random::<u8>()).collect();
            bad[..4].copy_from_slice(&1u32.to_le_bytes());
            let _ = s.send_to(&bad, server);
            let mut rx = [0u8; 256];
            while let Ok(n) = s.recv(&mut rx) {
                if n == 64 && rx[0] == 3 {
                    cookies += 1;
                } else {
                    other_answers += 1;
                }
            }
        }
    }
    assert!(
        cookies > 0,
        "no cookie reply under a handshake flood:\n{}",
        lab.vpn_log()
    );
    assert_eq!(other_answers, 0, "unknown keys got a handshake response");
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "the real peer suffered from the flood:\n{text}"
    );
}

/// `wg set` over the control socket changes a peer's allowed IPs live and in the
/// registry; `wg set ... remove` removes it.
#[test]
fn wg_set_over_the_control_socket_is_applied_and_persisted() {
    require("wg");
    let mut lab = Lab::new("");
    lab.add_peer("laptop");
    lab.start_vpn();
    let peers = lab.dir.path().join("vpn/peers.toml");
    let text = std::fs::read_to_string(&peers).unwrap();
    let laptop_key = text
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    run(Command::new("wg").args([
        "set",
        &lab.interface,
        "peer",
        &laptop_key,
        "allowed-ips",
        "10.200.0.2/32,10.99.0.0/24",
    ]));
    let text = std::fs::read_to_string(&peers).unwrap();
    assert!(text.contains("10.99.0.0/24"), "{text}");
    let show = run(Command::new("wg").args(["show", &lab.interface, "allowed-ips"]));
    assert!(String::from_utf8_lossy(&show.stdout).contains("10.99.0.0/24"));
    run(Command::new("wg").args(["set", &lab.interface, "peer", &laptop_key, "remove"]));
    let text = std::fs::read_to_string(&peers).unwrap();
    assert!(!text.contains(&laptop_key), "{text}");
    let show = run(Command::new("wg").args(["show", &lab.interface, "peers"]));
    assert!(String::from_utf8_lossy(&show.stdout).trim().is_empty());
}

/// Key and directory permissions: created 0600 / 0700, never logged, and a key
/// file others may read is refused with the fix; the control socket is 0600.
#[test]
fn keys_and_sockets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut lab = Lab::new("");
    lab.add_peer("laptop");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let vpn = lab.dir.path().join("vpn");
    assert_eq!(mode(&vpn), 0o700);
    assert_eq!(mode(&vpn.join("server.key")), 0o600);
    assert_eq!(mode(&vpn.join("peers.toml")), 0o600);
    lab.start_vpn();
    let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", lab.interface));
    assert_eq!(mode(&sock), 0o600);
    let secret = std::fs::read_to_string(vpn.join("server.key")).unwrap();
    assert!(!lab.vpn_log().contains(secret.trim()), "the private key was logged");

    std::fs::set_permissions(vpn.join("server.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = lab.wayfinder(&["vpn", "peer", "add", "other"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Small extension for running a command in the background and collecting it.
trait Background {
    fn output_in_background(&mut self) -> std::process::Child;
}

impl Background for Command {
    fn output_in_background(&mut self) -> std::process::Child {
        self.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    }
}

/// `wayfinder <args>` on a config file holding `text`, with no PanteraS
/// variables but `env`.
fn cli(text: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wayfinder.toml");
    std::fs::write(&path, text.replace("DIR", &dir.path().display().to_string())).unwrap();
    let mut cmd = Command::new(wayfinder_bin());
    cmd.args(args).arg("-c").arg(&path).current_dir(dir.path());
    for (var, _) in wayfinder::env::VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    (cmd.output().expect("run wayfinder"), dir)
}

/// `check` prints the `[vpn]` section and the derived endpoint; unknown keys and
/// bad values in `[vpn]` exit 64 naming the key.
#[test]
fn vpn_config_is_checked_and_shown() {
    let base = "[dns]\nupstreams = [\"127.0.0.1:9\"]\n";
    let (out, _d) = cli(
        &format!("{base}[vpn]\nroutes = [\"172.17.0.0/16\"]\n"),
        &["check"],
        &[("HOST_IP", "198.51.100.7")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("[vpn]") && text.contains("interface = \"wf0\""), "{text}");
    assert!(text.contains("address = \"10.200.0.1/24\""), "{text}");
    assert!(text.contains("client endpoint 198.51.100.7:51820"), "{text}");
    for (section, key) in [
        ("bogus = 1", "vpn.bogus"),
        ("address = \"10.200.0.300/24\"", "vpn.address"),
        ("routes = [\"172.17.0.0/16\", \"docker\"]", "vpn.routes"),
        ("listen = \"51820\"", "vpn.listen"),
    ] {
        let (out, _d) = cli(&format!("{base}[vpn]\n{section}\n"), &["check"], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{section}: {err}");
        assert!(err.contains(key) && err.contains("wayfinder.toml"), "{section}: {err}");
    }
}

/// `peer add` prints a complete client config (and a QR block with `--qr`),
/// needs an endpoint (naming `vpn.endpoint` and `HOST_IP`), refuses duplicates;
/// `peer list` shows the file when no server runs; `peer remove` removes.
#[test]
fn peer_commands_manage_the_registry() {
    let base = "[dns]\nupstreams = [\"127.0.0.1:9\"]\n[vpn]\ndir = \"DIR/vpn\"\nroutes = [\"172.17.0.0/16\"]\n";
    let (out, _d) = cli(base, &["vpn", "peer", "add", "laptop"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    // Without HOST_IP, IP and vpn.endpoint the host address is guessed; only a
    // machine where nothing fits has no endpoint to write.
    match wayfinder::net::host::guess(&std::collections::HashMap::new()) {
        None => {
            assert_eq!(out.status.code(), Some(64), "{err}");
            assert!(err.contains("vpn.endpoint") && err.contains("HOST_IP"), "{err}");
        }
        Some(guess) => {
            assert!(out.status.success(), "{err}");
            let config = String::from_utf8_lossy(&out.stdout);
            assert!(config.contains(&format!("Endpoint = {}:51820", guess.ip)), "{config}");
        }
    }

    let with_endpoint = format!(
        "{base}endpoint = \"vpn.example.com:51820\"\ninterface = \"{}\"\n",
        unique("wfc")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wayfinder.toml");
    std::fs::write(&path, with_endpoint.replace("DIR", &dir.path().display().to_string())).unwrap();
    let run_cli = |args: &[&str]| {
        let mut cmd = Command::new(wayfinder_bin());
        cmd.args(args)
            .arg("-c")
            .arg(&path)
            .env_remove("HOST_IP")
            .env("RUST_LOG", "warn");
        cmd.output().unwrap()
    };
    let out = run_cli(&["vpn", "peer", "add", "laptop", "--qr"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "[Interface]",
        "PrivateKey = ",
        "Address = 10.200.0.2/32",
        "DNS = 10.200.0.1, service.consul",
        "MTU = 1420",
        "[Peer]",
        "Endpoint = vpn.example.com:51820",
        "AllowedIPs = 10.200.0.0/24, 172.17.0.0/16",
        "PersistentKeepalive = 25",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(
        text.lines().filter(|l| l.contains('█')).count() > 10,
        "no QR block:\n{text}"
    );
    let private = text.lines().find_map(|l| l.strip_prefix("PrivateKey = ")).unwrap();
    let registry = std::fs::read_to_string(dir.path().join("vpn/peers.toml")).unwrap();
    assert!(!registry.contains(private), "the client's private key was stored");

    let out = run_cli(&["vpn", "peer", "add", "laptop"]);
    assert!(!out.status.success(), "a duplicate name was accepted");
    let out = run_cli(&["vpn", "peer", "add", "phone"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Address = 10.200.0.3/32"));
    let out = run_cli(&["vpn", "peer", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("laptop") && list.contains("10.200.0.3") && list.contains("server not running"),
        "{list}"
    );
    assert!(run_cli(&["vpn", "peer", "remove", "laptop"]).status.success());
    assert!(
        !run_cli(&["vpn", "peer", "remove", "laptop"]).status.success(),
        "removing twice succeeded"
    );
    let list = String::from_utf8_lossy(&run_cli(&["vpn", "peer", "list"]).stdout).to_string();
    assert!(!list.contains("laptop") && list.contains("phone"), "{list}");
}
