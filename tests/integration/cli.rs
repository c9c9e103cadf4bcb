//! The built binary as an operator meets it: `wayfinder check` (exit 0 and the
//! effective configuration, or exit 64 naming the file and the key), the PanteraS
//! environment overrides, and `wayfinder dns` as a child process: serving, zone
//! reload on SIGHUP, clean exit 0 on SIGTERM, and a clear failure when its port is
//! taken.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Unbound, dig, free_port};

/// Exit status of a configuration error (sysexits `EX_USAGE`).
const EXIT_CONFIG: i32 = 64;

use crate::harness::wayfinder_command as wayfinder;

/// Runs `wayfinder check -c <file holding text>` to completion.
fn check(text: &str, env: &[(&str, &str)]) -> (PathBuf, Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wayfinder.toml");
    std::fs::write(&path, text).unwrap();
    let out = wayfinder(dir.path(), &["check", "-c", path.to_str().unwrap()], env)
        .output()
        .expect("run wayfinder check");
    (path, out, dir)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The TOML that `check` printed: everything before the `configuration ok` line
/// (the derived values are `#` comments).
fn printed_toml(out: &Output) -> toml::Table {
    let text = stdout(out);
    let body = text
        .strip_suffix("configuration ok\n")
        .unwrap_or_else(|| panic!("`configuration ok` is not the last line:\n{text}"));
    toml::from_str(body).unwrap_or_else(|e| panic!("check printed invalid TOML ({e}):\n{text}"))
}

fn get<'a>(t: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    t.get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("{section}.{key} missing from {t:#?}"))
}

/// A `wayfinder dns` child: killed (and reaped) on drop, so a failed assertion
/// never leaves a server behind; also killed if the test process dies.
struct Running {
    child: Option<Child>,
    log: PathBuf,
}

impl Running {
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        // SAFETY: prctl is async-signal-safe and affects only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Running {
            child: Some(cmd.spawn().expect("start wayfinder")),
            log,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("running").id() as libc::pid_t
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, if it exits within `limit`.
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
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

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `check` on a good file exits 0, prints the effective TOML with every default
/// filled in (itself a valid config) and ends with `configuration ok`.
#[test]
fn check_prints_the_effective_configuration() {
    let text = "[dns]\nlisten = [\"127.0.0.1:5353\"]\nupstreams = [\"192.0.2.1\"]\n\
                wildcard_domain = \".apps.example.com\"\nwildcard_targets = [\"10.0.0.5\"]\n";
    let (path, out, _dir) = check(text, &[]);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
    assert!(stdout(&out).contains(&path.display().to_string()), "{}", stdout(&out));
    let t = printed_toml(&out);
    assert_eq!(
        get(&t, "dns", "listen").as_array().unwrap()[0].as_str(),
        Some("127.0.0.1:5353")
    );
    assert_eq!(
        get(&t, "dns", "upstreams").as_array().unwrap()[0].as_str(),
        Some("192.0.2.1")
    );
    assert_eq!(get(&t, "dns", "wildcard_domain").as_str(), Some(".apps.example.com"));
    assert_eq!(
        get(&t, "dns", "consul_timeout").as_str(),
        Some("2s"),
        "default filled in"
    );
    assert_eq!(
        get(&t, "consul", "http").as_str(),
        Some("127.0.0.1:8500"),
        "default filled in"
    );
    // The request-body and per-client limits (issue 21), defaults filled in.
    for (key, value) in [
        ("body_buffer_bytes", toml::Value::Integer(65536)),
        ("body_buffer_total_bytes", toml::Value::Integer(64 << 20)),
        ("min_body_rate", toml::Value::Integer(500)),
        ("request_timeout", toml::Value::String("5m".into())),
        ("max_client_share", toml::Value::Integer(50)),
    ] {
        assert_eq!(get(&t, "lb", key), &value, "lb.{key}");
    }
    assert!(
        stdout(&out).contains("# dns upstreams resolved: [192.0.2.1:53]"),
        "{}",
        stdout(&out)
    );

    // The printed configuration is itself a valid file meaning the same thing.
    let printed = toml::to_string(&t).unwrap();
    let (_, again, _dir2) = check(&printed, &[]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(printed_toml(&again), t);
}

/// Every configuration mistake exits 64 with one message on stderr naming the file
/// and the key (and nothing claiming success on stdout).
#[test]
fn broken_configs_exit_64_naming_file_and_key() {
    const UP: &str = "upstreams = [\"192.0.2.1\"]\n";
    let cases: &[(&str, String, &str, &str)] = &[
        (
            "unknown key",
            format!("[dns]\n{UP}bogus = 1\n"),
            "dns.bogus",
            "unknown field",
        ),
        (
            "wrong type",
            format!("[dns]\n{UP}listen = [\"nope\"]\n"),
            "dns.listen",
            "line 3",
        ),
        (
            "bad duration",
            format!("[dns]\n{UP}consul_timeout = \"soon\"\n"),
            "dns.consul_timeout",
            "soon",
        ),
        (
            "upstream loop",
            "[dns]\nlisten = [\"127.0.0.1:5353\"]\nupstreams = [\"127.0.0.1:5353\"]\n".into(),
            "dns.upstreams",
            "loop",
        ),
        // A missing resolv.conf is a start-up warning, not an error (see
        // an_upstream_file_that_is_a_directory_is_a_warning_not_a_restart_loop);
        // an entry that is neither an address nor a path is.
        (
            "upstream neither address nor path",
            "[dns]\nupstreams = [\"resolv.conf\"]\n".into(),
            "dns.upstreams",
            "neither an `IP[:port]` nor a resolv.conf path",
        ),
        (
            "wildcard without targets",
            format!("[dns]\n{UP}wildcard_domain = \".apps.example.com\"\n"),
            "dns.wildcard_targets",
            "needs targets",
        ),
    ];
    for (what, text, key, problem) in cases {
        let (path, out, _dir) = check(text, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{what}: stderr:\n{err}");
        assert!(!stdout(&out).contains("configuration ok"), "{what}: {}", stdout(&out));
        let file = path.display().to_string();
        assert!(
            err.contains(&format!("{file}: {key}:")),
            "{what}: wanted `{file}: {key}:` in:\n{err}"
        );
        assert!(err.contains(problem), "{what}: wanted `{problem}` in:\n{err}");
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let out = wayfinder(dir.path(), &["check", "-c", missing.to_str().unwrap()], &[])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "missing -c file: {err}");
    assert!(err.contains(&missing.display().to_string()), "missing -c file: {err}");
    assert!(err.contains("could not read"), "missing -c file: {err}");
}

/// The PanteraS variables override the file, and `check` shows the result:
/// `CONSUL_IP` moves both Consul addresses (ports kept), `HAPROXY_ADD_DOMAIN` sets
/// the wildcard domain and `HOST_IP` becomes its target.
#[test]
fn environment_overrides_show_in_check() {
    let (_, out, _dir) = check(
        "[consul]\nhttp = \"127.0.0.1:8501\"\n[dns]\nupstreams = [\"192.0.2.1\"]\n",
        &[
            ("CONSUL_IP", "10.1.1.2"),
            ("HAPROXY_ADD_DOMAIN", ".apps.example.com"),
            ("HOST_IP", "10.1.1.3"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
    let t = printed_toml(&out);
    assert_eq!(get(&t, "consul", "http").as_str(), Some("10.1.1.2:8501"));
    let consul_dns: Vec<&str> = get(&t, "consul", "dns")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(consul_dns, ["10.1.1.2:8600"]);
    assert_eq!(get(&t, "dns", "wildcard_domain").as_str(), Some(".apps.example.com"));
    let targets: Vec<&str> = get(&t, "dns", "wildcard_targets")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(targets, ["10.1.1.3"]);
}

/// PanteraS's `IP` (its README's `restricted/host` line) sets `HOST_IP` and
/// `CONSUL_IP` unless those are given; `--restricted DIR` reads `common`,
/// `host`, `overwrite` in that order over the environment, as
/// `generate_yml.sh` sourced them; `check` says where the host address came from.
#[test]
fn pantera_ip_and_restricted_folder_show_in_check() {
    let base = "[dns]\nupstreams = [\"192.0.2.1\"]\nwildcard_domain = \".apps.example.com\"\n";
    let (_, out, _dir) = check(base, &[("IP", "10.9.8.7")]);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
    let t = printed_toml(&out);
    assert_eq!(get(&t, "consul", "http").as_str(), Some("10.9.8.7:8500"));
    let targets = get(&t, "dns", "wildcard_targets").as_array().unwrap().clone();
    assert_eq!(targets, [toml::Value::from("10.9.8.7")]);
    assert!(
        stdout(&out).contains("# host address: 10.9.8.7 (from IP)"),
        "{}",
        stdout(&out)
    );

    // Given ones win over IP.
    let (_, out, _dir) = check(
        base,
        &[("IP", "10.9.8.7"), ("HOST_IP", "10.1.1.1"), ("CONSUL_IP", "10.2.2.2")],
    );
    let t = printed_toml(&out);
    assert_eq!(get(&t, "consul", "http").as_str(), Some("10.2.2.2:8500"));
    assert_eq!(
        get(&t, "dns", "wildcard_targets").as_array().unwrap().clone(),
        [toml::Value::from("10.1.1.1")]
    );
    assert!(stdout(&out).contains("# host address: 10.1.1.1 (from HOST_IP)"));

    // A PanteraS restricted folder, as its README builds it.
    let dir = tempfile::tempdir().unwrap();
    let restricted = dir.path().join("restricted");
    std::fs::create_dir(&restricted).unwrap();
    std::fs::write(restricted.join("common"), "CONSUL_DC=${CONSUL_DC:-dc1}\nSLAVE=true\n").unwrap();
    std::fs::write(
        restricted.join("host"),
        "CONSUL_HOSTS=\"-join=masterhost-1 -join=masterhost-2\"\nIP=10.0.0.21\nSLAVE=false\n",
    )
    .unwrap();
    std::fs::write(restricted.join("overwrite"), "HAPROXY_ADD_DOMAIN=.paas.example.com\n").unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(&config, "[dns]\nupstreams = [\"192.0.2.1\"]\n").unwrap();
    let out = wayfinder(
        dir.path(),
        &[
            "check",
            "-c",
            config.to_str().unwrap(),
            "--restricted",
            restricted.to_str().unwrap(),
        ],
        &[("CONSUL_DC", "eu1"), ("HAPROXY_ADD_DOMAIN", ".apps.example.com")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    let t = printed_toml(&out);
    assert_eq!(get(&t, "consul", "http").as_str(), Some("10.0.0.21:8500"));
    assert_eq!(
        get(&t, "consul", "datacenter").as_str(),
        Some("eu1"),
        "${{CONSUL_DC:-dc1}} keeps the env"
    );
    assert_eq!(
        get(&t, "dns", "wildcard_domain").as_str(),
        Some(".paas.example.com"),
        "overwrite wins"
    );
    assert!(text.contains("# host address: 10.0.0.21 (from IP)"), "{text}");
    assert!(
        text.contains("restricted files read, in order:") && text.contains("overwrite"),
        "{text}"
    );
    assert!(
        text.contains("# role: master (MASTER=true, SLAVE=false)"),
        "SLAVE=false in host wins over common's SLAVE=true:\n{text}"
    );

    // A line the shell would have run is refused, naming file and line.
    std::fs::write(restricted.join("host"), "IP=10.0.0.21\nIP=$(hostname -i)\n").unwrap();
    let out = wayfinder(
        dir.path(),
        &[
            "check",
            "-c",
            config.to_str().unwrap(),
            "--restricted",
            restricted.to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(
        err.contains("host line 2") && err.contains("command substitution"),
        "{err}"
    );
}

/// Without HOST_IP and IP the host address is guessed as PanteraS did, and
/// `check` says from what (or that nothing fits).
#[test]
fn the_host_address_is_guessed_and_said_so() {
    let (_, out, _dir) = check(
        "[dns]\nupstreams = [\"192.0.2.1\"]\n",
        &[("DOCKER_HOST", "tcp://10.4.4.4:2376")],
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    // The host name comes first; on a machine where it resolves to something
    // other than loopback that is the guess, else DOCKER_HOST.
    let expected = wayfinder::net::host::guess(&std::collections::HashMap::from([(
        "DOCKER_HOST".to_string(),
        "tcp://10.4.4.4:2376".to_string(),
    )]))
    .expect("DOCKER_HOST gives a guess at least");
    assert!(
        text.contains(&format!("# host address: {} ({})", expected.ip, expected.from)),
        "{text}"
    );
}

/// `docker run --env-file` and compose v1's `env_file:` keep a value's quotes:
/// the quoted form of every PanteraS value reads as the unquoted one.
#[test]
fn quoted_values_from_an_env_file_are_unwrapped() {
    let (_, out, _dir) = check(
        "[dns]\nupstreams = [\"192.0.2.1\"]\n",
        &[
            ("HAPROXY_ADD_DOMAIN", "\".apps.example.com\""),
            ("HOST_IP", "'10.1.1.3'"),
            ("CONSUL_IP", "\"10.1.1.2\""),
            ("CONSUL_DC", "\"eu1\""),
            ("MASTER", "\"false\""),
            ("CONSUL_HOSTS", "\"-join=10.0.0.11 -join=10.0.0.12\""),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
    let t = printed_toml(&out);
    assert_eq!(get(&t, "dns", "wildcard_domain").as_str(), Some(".apps.example.com"));
    assert_eq!(get(&t, "consul", "http").as_str(), Some("10.1.1.2:8500"));
    assert_eq!(get(&t, "consul", "datacenter").as_str(), Some("eu1"));
    let text = stdout(&out);
    assert!(text.contains("# host address: 10.1.1.3 (from HOST_IP)"), "{text}");
    assert!(text.contains("MASTER=false"), "{text}");
}

/// A malformed variable is a configuration error naming the variable.
#[test]
fn bad_environment_value_exits_64_naming_the_variable() {
    let (_, out, _dir) = check("[dns]\nupstreams = [\"192.0.2.1\"]\n", &[("CONSUL_IP", "not-an-ip")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{err}");
    assert!(err.contains("environment: CONSUL_IP:"), "{err}");
    assert!(err.contains("not-an-ip"), "{err}");
    // Said once: no `caused by:` repeating the message.
    assert_eq!(err.matches("not-an-ip").count(), 1, "{err}");
    assert!(!err.contains("caused by"), "{err}");
}

/// `check` refuses a CONSUL_HOSTS/CONSUL_PARAMS word that `consul agent` would
/// refuse (exit 64, naming the variable), rather than an `up` whose Consul unit
/// crash-loops into `failed`.
#[test]
fn consul_words_consul_would_refuse_exit_64_naming_the_variable() {
    for (var, value, needle) in [
        ("CONSUL_HOSTS", "-join=", "-join is empty"),
        ("CONSUL_HOSTS", "\"-join=10.0.0.1 -join=10.0.0.2", "quote is not closed"),
        (
            "CONSUL_HOSTS",
            "-join=10.0.0.1,10.0.0.2",
            "-join takes a host name or address",
        ),
        ("CONSUL_PARAMS", "-bootstrap-expct 3", "is not a flag of consul agent"),
        ("CONSUL_PARAMS", "bootstrap-expect=3", "is not a flag"),
    ] {
        let (_, out, _dir) = check("[dns]\nupstreams = [\"192.0.2.1\"]\n", &[(var, value)]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{var}={value}: {err}");
        assert!(err.contains(&format!("environment: {var}:")), "{err}");
        assert!(err.contains(needle), "{var}={value}: {err}");
    }
    let (_, out, _dir) = check(
        "[dns]\nupstreams = [\"192.0.2.1\"]\n",
        &[("CONSUL_PARAMS", "-bootstrap-expct 3")],
    );
    assert!(stderr(&out).contains("-bootstrap-expect"), "the known flags are listed");
    let (_, out, _dir) = check(
        "[dns]\nupstreams = [\"192.0.2.1\"]\n",
        &[
            ("CONSUL_HOSTS", "-join=m1 -join m2 m3"),
            ("CONSUL_PARAMS", "-bootstrap-expect 3 -ui"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", stderr(&out));
}

/// Usage errors are clap's (exit 2); `--version` works.
#[test]
fn usage_errors_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = wayfinder(dir.path(), &["--version"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("wayfinder "), "{}", stdout(&out));
    for args in [&["frobnicate"][..], &[], &["check", "--bogus"]] {
        let out = wayfinder(dir.path(), args, &[]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

fn zone(serial: u32, db: &str) -> String {
    format!(
        "$TTL 60\n\
         @  IN SOA ns.example.internal. hostmaster.example.internal. {serial} 3600 600 86400 30\n\
         @  IN NS  ns.example.internal.\n\
         ns IN A   127.0.0.1\n\
         db IN A   {db}\n"
    )
}

/// Dig until `name` answers `want` or `limit` passes; the last output otherwise.
async fn dig_until(addr: SocketAddr, args: &[&str], want: &[&str], limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let d = dig(addr, args).await;
        if d.answers() == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(d.out);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `wayfinder dns` as a real process: it serves the zone authoritatively (AA) and
/// the upstream; SIGHUP reloads the zone at once (polling is set to an hour, so
/// nothing else could); SIGTERM stops it with exit status 0 within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_serves_reloads_on_sighup_and_exits_0_on_sigterm() {
    let upstream = Unbound::start(&["www.test. 300 IN A 192.0.2.10"]);
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    std::fs::create_dir(&zones).unwrap();
    let zone_file = zones.join("example.internal.zone");
    std::fs::write(&zone_file, zone(1, "10.9.9.10")).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nlisten = [\"{addr}\"]\nupstreams = [\"{}\"]\nzones_dir = {:?}\nzones_poll = \"1h\"\nworkers = 2\n",
            upstream.addr,
            zones.display().to_string()
        ),
    )
    .unwrap();
    let mut server = Running::spawn(
        wayfinder(dir.path(), &["dns", "-c", config.to_str().unwrap()], &[]),
        dir.path().join("wayfinder.log"),
    );

    if let Err(out) = dig_until(addr, &["www.test", "A"], &["192.0.2.10"], Duration::from_secs(10)).await {
        panic!("wayfinder dns never answered:\n{out}\nlog:\n{}", server.log());
    }
    let d = dig(addr, &["db.example.internal", "A"]).await;
    assert_eq!(d.answers(), ["10.9.9.10"], "{}\nlog:\n{}", d.out, server.log());
    assert!(d.has_flag("aa"), "zone answers are authoritative: {}", d.out);

    std::fs::write(&zone_file, zone(2, "10.9.9.11")).unwrap();
    // Nothing reloads without the signal (zones_poll is an hour).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = dig(addr, &["db.example.internal", "A"]).await;
    assert_eq!(d.answers(), ["10.9.9.10"], "reloaded without SIGHUP: {}", d.out);

    server.signal(libc::SIGHUP);
    let started = Instant::now();
    if let Err(out) = dig_until(
        addr,
        &["db.example.internal", "A"],
        &["10.9.9.11"],
        Duration::from_secs(2),
    )
    .await
    {
        panic!(
            "SIGHUP did not reload the zone within 2 s:\n{out}\nlog:\n{}",
            server.log()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let soa = dig(addr, &["example.internal", "SOA"]).await;
    assert_eq!(soa.section("ANSWER")[0].3.split(' ').nth(2), Some("2"), "{}", soa.out);
    // Still alive after the hangup (SIGHUP's default action would have killed it).
    assert!(server.wait_exit(Duration::ZERO).await.is_none(), "exited on SIGHUP");

    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM; log:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", server.log());
    assert!(
        server.log().contains("SIGTERM"),
        "shutdown not logged:\n{}",
        server.log()
    );
}

/// The compose file mounts the host's `/etc/resolv.conf.orig`; on a host
/// without one Docker makes a directory there. The dns starts anyway (no exit
/// 64, so no restart loop): a WARN says why there is no upstream, its zones
/// still answer, and other names get SERVFAIL at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_file_that_is_a_directory_is_a_warning_not_a_restart_loop() {
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    std::fs::create_dir(&zones).unwrap();
    std::fs::write(zones.join("example.internal.zone"), zone(1, "10.9.9.10")).unwrap();
    let saved = dir.path().join("resolv.conf.orig");
    std::fs::create_dir(&saved).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nlisten = [\"{addr}\"]\nupstreams = [{:?}]\nzones_dir = {:?}\nworkers = 2\n",
            saved.display().to_string(),
            zones.display().to_string()
        ),
    )
    .unwrap();
    let out = wayfinder(dir.path(), &["check", "-c", config.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("is a directory"), "{}", stdout(&out));
    let server = Running::spawn(
        wayfinder(dir.path(), &["dns", "-c", config.to_str().unwrap()], &[]),
        dir.path().join("wayfinder.log"),
    );
    if let Err(out) = dig_until(
        addr,
        &["db.example.internal", "A"],
        &["10.9.9.10"],
        Duration::from_secs(10),
    )
    .await
    {
        panic!("wayfinder dns never answered:\n{out}\nlog:\n{}", server.log());
    }
    let d = dig(addr, &["www.example.org", "A"]).await;
    assert_eq!(d.status(), "SERVFAIL", "{}\nlog:\n{}", d.out, server.log());
    let log = server.log();
    assert!(log.contains("WARN") && log.contains("is a directory"), "{log}");
    assert!(log.contains("no upstream resolver"), "{log}");
}

/// A listen port that is already taken (UDP or TCP) ends `wayfinder dns` at once
/// with a non-zero status and `could not bind` naming the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_exits_nonzero_with_could_not_bind() {
    let dir = tempfile::tempdir().unwrap();
    for proto in ["udp", "tcp"] {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let _udp_holder = (proto == "udp").then(|| std::net::UdpSocket::bind(addr).unwrap());
        let _tcp_holder = (proto == "tcp").then(|| std::net::TcpListener::bind(addr).unwrap());
        let config = dir.path().join(format!("{proto}.toml"));
        std::fs::write(
            &config,
            format!("[dns]\nlisten = [\"{addr}\"]\nupstreams = [\"192.0.2.1\"]\nworkers = 2\n"),
        )
        .unwrap();
        let mut server = Running::spawn(
            wayfinder(dir.path(), &["dns", "-c", config.to_str().unwrap()], &[]),
            dir.path().join(format!("{proto}.log")),
        );
        let status = server
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{proto} port taken: still running after 5 s; log:\n{}", server.log()));
        let log = server.log();
        assert!(!status.success(), "{proto} port taken: {status:?}\n{log}");
        assert!(log.contains("could not bind"), "{proto}: {log}");
        assert!(log.contains(&format!("{proto} socket on {addr}")), "{proto}: {log}");
    }
}

/// A certificate file that cannot be used stops `wayfinder lb` at start with
/// exit 64, naming the file and what is wrong with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_with_a_broken_certificate_exits_64_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("site.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let config = dir.path().join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{}\"\n[dns]\nupstreams = [\"192.0.2.1\"]\n\
             [lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"\"\nregister = \"\"\ncerts = [\"{}\"]\n",
            free_port(),
            free_port(),
            pem.display()
        ),
    )
    .unwrap();
    let mut server = Running::spawn(
        wayfinder(
            dir.path(),
            &["lb", "-c", config.to_str().unwrap()],
            &[("HAPROXY_SSL", "true"), ("LISTEN_IP", "127.0.0.1")],
        ),
        dir.path().join("lb.log"),
    );
    let status = server
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running with a broken certificate; log:\n{}", server.log()));
    let log = server.log();
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{log}");
    assert!(log.contains("site.pem") && log.contains("certificate"), "{log}");
}

/// A command checks the sections of what it runs: `wayfinder lb` starts with a
/// `[dns]` the dns would refuse (PanteraS's HAPROXY_ADD_DOMAIN without targets,
/// a loop upstream), `wayfinder dns` refuses it naming the key; `up` on a host
/// whose role does not start the lb runs with a bad `[lb]` (and says so), while
/// `check`, the file's validator, refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_checks_what_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("w.toml");
    let dns_port = free_port();
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{}\"\n\
             [dns]\nlisten = [\"127.0.0.1:{dns_port}\"]\nupstreams = [\"127.0.0.1:{dns_port}\"]\n\
             [lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"\"\nregister = \"\"\n",
            free_port(),
            free_port(),
        ),
    )
    .unwrap();
    let env = [("HAPROXY_ADD_DOMAIN", ".apps.example.com")];
    let mut lb = Running::spawn(
        wayfinder(dir.path(), &["lb", "-c", config.to_str().unwrap()], &env),
        dir.path().join("lb.log"),
    );
    let exited = lb.wait_exit(Duration::from_secs(3)).await;
    assert!(exited.is_none(), "the lb stopped on [dns]: {exited:?}\n{}", lb.log());
    assert!(lb.log().contains("not checked"), "{}", lb.log());
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(Duration::from_secs(15)).await.expect("stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", lb.log());

    let out = wayfinder(dir.path(), &["dns", "-c", config.to_str().unwrap()], &env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    // The first of its two problems (which one depends on whether this machine
    // gives a host address to guess).
    let err = stderr(&out);
    assert!(
        err.contains("dns.wildcard_targets") || err.contains("dns.upstreams"),
        "{err}"
    );

    // `check` validates the whole file, whatever this host starts.
    let (_, out, _d) = check(
        "[dns]\nupstreams = [\"192.0.2.1\"]\n[lb]\nstats = \"nope\"\n",
        &[("SLAVE", "false")],
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    assert!(stderr(&out).contains("lb.stats"), "{}", stderr(&out));

    // `up` checks what the role starts: a host without the lb runs with a
    // broken [lb], and logs it as not checked.
    let up_config = dir.path().join("up.toml");
    std::fs::write(
        &up_config,
        format!(
            "[dns]\nlisten = [\"127.0.0.1:{}\"]\nupstreams = [\"192.0.2.1\"]\nworkers = 1\n\
             [lb]\nstats = \"nope\"\n[supervisor]\nadmin = \"\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut up = Running::spawn(
        wayfinder(
            dir.path(),
            &["up", "-c", up_config.to_str().unwrap()],
            &[("SLAVE", "false"), ("START_CONSUL", "false")],
        ),
        dir.path().join("up.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !up.log().contains("dns listening") {
        if let Some(status) = up.wait_exit(Duration::from_millis(100)).await {
            panic!("up stopped on a broken [lb] it does not run: {status:?}\n{}", up.log());
        }
        assert!(Instant::now() < deadline, "dns never started:\n{}", up.log());
    }
    assert!(
        up.log().contains("not checked") && up.log().contains("lb.stats"),
        "{}",
        up.log()
    );
    up.signal(libc::SIGTERM);
    let status = up.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", up.log());
}

/// `up` on a host without Consul: when its plan starts the built-in agent
/// (the default), it exits 64 at once naming the install step, rather than
/// crash-looping a unit; with `START_CONSUL=false` (an agent that runs
/// elsewhere) the same PATH is fine and `up` runs until SIGTERM (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_without_a_consul_binary_exits_64_naming_the_install_step() {
    let dir = tempfile::tempdir().unwrap();
    // A PATH with the usual tools but no consul: an empty directory.
    let path = dir.path().join("bin");
    std::fs::create_dir(&path).unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{}\"\n[dns]\nlisten = [\"127.0.0.1:{}\"]\nupstreams = [\"192.0.2.1\"]\nworkers = 1\n\
             [supervisor]\nadmin = \"\"\n",
            free_port(),
            free_port(),
        ),
    )
    .unwrap();
    let up = |vars: &[(&str, &str)], log: &str| {
        let mut cmd = wayfinder(dir.path(), &["up", "-c", config.to_str().unwrap()], vars);
        cmd.env("PATH", &path).env_remove("NOTIFY_SOCKET");
        Running::spawn(cmd, dir.path().join(log))
    };

    let mut server = up(&[("START_LB", "false")], "no-consul.log");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("up without consul still runs after 10 s; log:\n{}", server.log()));
    let log = server.log();
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{log}");
    for want in [
        "supervisor.consul.command",
        "`consul` is not in PATH",
        "scripts/install-deps.sh",
        "START_CONSUL=false",
    ] {
        assert!(log.contains(want), "`{want}` not in:\n{log}");
    }
    assert!(
        !log.contains("starting up"),
        "it stopped before starting anything:\n{log}"
    );

    let mut server = up(&[("START_LB", "false"), ("START_CONSUL", "false")], "elsewhere.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("dns listening") {
        if let Some(status) = server.wait_exit(Duration::from_millis(100)).await {
            panic!("up with START_CONSUL=false exited {status:?}:\n{}", server.log());
        }
        assert!(Instant::now() < deadline, "dns never started:\n{}", server.log());
    }
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).await;
    let log = server.log();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(!log.contains("supervisor.consul.command"), "{log}");
}

/// A dns-only host with a `LISTEN_IP` this host does not have stops at once
/// (exit 64 naming the variable) instead of binding it with IP_FREEBIND and
/// never hearing a question: only the vpn's tunnel address may be absent at
/// bind time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_listen_ip_this_host_lacks_exits_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dns.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{}\"\n[dns]\nlisten = [\"127.0.0.1:{}\"]\nupstreams = [\"192.0.2.1\"]\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    // TEST-NET-3: never an address of a test machine.
    let mut server = Running::spawn(
        wayfinder(
            dir.path(),
            &["dns", "-c", config.to_str().unwrap()],
            &[("LISTEN_IP", "203.0.113.77")],
        ),
        dir.path().join("dns.log"),
    );
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running on an address it cannot have; log:\n{}", server.log()));
    let log = server.log();
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{log}");
    assert!(log.contains("LISTEN_IP=203.0.113.77"), "{log}");
}

/// A dns on a wildcard address answers from the address it was asked on
/// (IP_PKTINFO), on every path: a local answer from the worker's batch, an
/// upstream answer from the task path, a Consul failure from the worker's own
/// Consul client, and TCP. Without it the kernel picks the source by the
/// route back (here 127.0.0.1 for a question to 127.0.0.5; on a docker host
/// the bridge's address for a container asking the host's), and the
/// client's resolver drops the answer: dig says "reply from unexpected source".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_dns_answers_from_the_address_it_was_asked_on() {
    let upstream = Unbound::start(&["up.test. 300 IN A 192.0.2.99"]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{}\"\ndns = [\"127.0.0.1:{}\"]\n\
             [dns]\nlisten = [\"0.0.0.0:{port}\"]\nupstreams = [\"{}\"]\nworkers = 1\n\
             wildcard_domain = \".apps.example.com\"\nwildcard_targets = [\"10.0.0.5\"]\nconsul_timeout = \"500ms\"\n",
            free_port(),
            free_port(),
            upstream.addr,
        ),
    )
    .unwrap();
    let server = Running::spawn(
        wayfinder(dir.path(), &["dns", "-c", config.to_str().unwrap()], &[]),
        dir.path().join("wayfinder.log"),
    );
    // Another loopback address than the one dig sends from.
    let asked = SocketAddr::from(([127, 0, 0, 5], port));
    if let Err(out) = dig_until(
        asked,
        &["x.apps.example.com", "A"],
        &["10.0.0.5"],
        Duration::from_secs(10),
    )
    .await
    {
        panic!("no answer from the address asked:\n{out}\nlog:\n{}", server.log());
    }
    let d = dig(asked, &["up.test", "A"]).await;
    assert_eq!(d.answers(), ["192.0.2.99"], "the task path: {}", d.out);
    let d = dig(asked, &["web.service.consul", "A"]).await;
    assert_eq!(
        d.status(),
        "SERVFAIL",
        "the worker's Consul client (no Consul here): {}",
        d.out
    );
    let d = dig(asked, &["x.apps.example.com", "A", "+tcp"]).await;
    assert_eq!(d.answers(), ["10.0.0.5"], "TCP: {}", d.out);
}
