//! Every file in `deploy/` is a fixture: the systemd unit passes
//! `systemd-analyze verify` and has the keys it must; the Dockerfile has its
//! instructions; docker-compose.yml parses as YAML with the host network,
//! NET_ADMIN and /dev/net/tun; the `restricted/host` examples parse as KEY=VALUE
//! with only variables Wayfinder reads and give the documented roles; the
//! Marathon plans parse and carry SERVICE_TAGS; every `deploy/*.toml` passes
//! `wayfinder check`. (No Docker engine here: shape, not runs.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{require, wayfinder_bin};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy().join(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

/// `[Section]` -> key -> values (a key may repeat), comments and blanks skipped.
fn ini(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

#[test]
fn systemd_unit_verifies_and_has_the_keys_it_must() {
    let text = read("wayfinder.service");
    let unit = ini(&text);
    let service = &unit["Service"];
    let one = |k: &str| service.get(k).map(|v| v.join(" ")).unwrap_or_default();
    assert_eq!(one("Type"), "notify", "readiness through sd_notify");
    assert!(one("ExecStart").contains("wayfinder up -c "), "{}", one("ExecStart"));
    assert!(one("ExecReload").contains("-HUP"), "SIGHUP reloads zones");
    for cap in ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"] {
        assert!(one("AmbientCapabilities").contains(cap), "{cap}");
        assert!(one("CapabilityBoundingSet").contains(cap), "{cap}");
    }
    assert!(service.contains_key("User") || one("DynamicUser") == "yes", "not root");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert!(
        one("EnvironmentFile").contains("restricted/host"),
        "the PanteraS role file"
    );
    assert_eq!(one("KillMode"), "mixed", "up stops its own children first");
    assert!(one("StateDirectory").contains("wayfinder"));
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);

    // The vpn under the unit: its state (vpn.dir of appliance.toml, relative to
    // the working directory) inside the writable StateDirectory; its control
    // socket's directory as RuntimeDirectory (ProtectSystem=strict makes /run
    // read-only otherwise), kept at stop; the TUN device and netlink (address,
    // nft table) allowed.
    assert_eq!(
        one("WorkingDirectory"),
        format!("/var/lib/{}", one("StateDirectory")),
        "the working directory is the state directory"
    );
    let (ok, out, err) = check("appliance.toml", &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("dir = \"vpn\""),
        "vpn.dir is relative to the state directory:\n{out}"
    );
    let socket_dir = std::path::Path::new(wayfinder::vpn::uapi::SOCKET_DIR);
    assert_eq!(socket_dir.file_name().unwrap(), one("RuntimeDirectory").as_str());
    assert!(
        socket_dir.starts_with("/var/run") || socket_dir.starts_with("/run"),
        "{}",
        socket_dir.display()
    );
    assert_eq!(one("RuntimeDirectoryPreserve"), "yes", "other wireguard sockets stay");
    assert_eq!(one("DeviceAllow"), "/dev/net/tun rw");
    assert!(one("RestrictAddressFamilies").contains("AF_NETLINK"));
    // Forwarding: either the unit may write /proc/sys, or it keeps it
    // read-only and ships the sysctl file it names.
    if one("ProtectKernelTunables") == "yes" {
        assert!(
            text.contains("deploy/sysctl-wayfinder-vpn.conf"),
            "the unit says how forwarding is set"
        );
        let sysctl = read("sysctl-wayfinder-vpn.conf");
        let settings: Vec<(&str, &str)> = sysctl
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .expect("KEY = VALUE")
            })
            .collect();
        assert_eq!(settings, [("net.ipv4.ip_forward", "1")]);
    }

    // systemd's own check, on a copy whose commands point at the built binary
    // (verify insists that they exist). Any warning counts as a failure.
    let verify = require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("wayfinder.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/wayfinder", &wayfinder_bin().display().to_string()),
    )
    .unwrap();
    // With the docker hosts' drop-in, found where systemd would (a mistyped
    // key there is a warning, hence a failure).
    let dropin_text = read("wayfinder-docker.conf");
    let dropin = ini(&dropin_text);
    assert_eq!(
        dropin["Unit"]["After"],
        ["docker.service"],
        "docker0 before LISTEN_IP is read"
    );
    assert_eq!(
        dropin["Service"]["SupplementaryGroups"],
        ["docker"],
        "the socket's group"
    );
    assert!(
        text.contains("deploy/wayfinder-docker.conf"),
        "the unit names its drop-in"
    );
    std::fs::create_dir(dir.path().join("wayfinder.service.d")).unwrap();
    std::fs::write(dir.path().join("wayfinder.service.d/docker.conf"), &dropin_text).unwrap();
    let out = Command::new(verify)
        .arg("verify")
        .arg(&copy)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

#[test]
fn dockerfile_has_its_instructions() {
    let text = read("Dockerfile");
    // Instructions with continuation lines joined.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (op.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect();
    let known = [
        "FROM",
        "RUN",
        "COPY",
        "WORKDIR",
        "VOLUME",
        "EXPOSE",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "ENV",
        "ARG",
        "LABEL",
        "USER",
    ];
    for (op, _) in &instructions {
        assert!(known.contains(&op.as_str()), "unknown instruction {op}");
    }
    let all = |op: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    assert_eq!(instructions[0].0, "FROM");
    assert!(all("FROM").len() >= 2, "a build stage and a slim runtime");
    assert!(all("RUN").iter().any(|r| r.contains("cargo build --release")));
    assert!(
        all("RUN")
            .iter()
            .any(|r| r.contains("apt-get install") && r.contains("nftables")),
        "nft for the vpn's table"
    );
    assert!(
        all("COPY").iter().any(|r| r.contains("/usr/local/bin/consul")),
        "consul in the image"
    );
    assert!(all("COPY").iter().any(|r| r.contains("target/release/wayfinder")));
    let exposed = all("EXPOSE").join(" ");
    for port in ["53/udp", "53/tcp", "80/tcp", "8500/tcp"] {
        assert!(exposed.contains(port), "EXPOSE {port}");
    }
    assert_eq!(all("STOPSIGNAL"), ["SIGTERM"]);
    let entry: Vec<String> = serde_json::from_str(all("ENTRYPOINT")[0]).expect("exec-form ENTRYPOINT");
    let cmd: Vec<String> = serde_json::from_str(all("CMD")[0]).expect("exec-form CMD");
    assert_eq!(entry, ["wayfinder"]);
    assert_eq!(cmd[0], "up");
    assert!(all("HEALTHCHECK")[0].contains("wayfinder"));
    // Every local file it copies exists.
    for copy in all("COPY").iter().filter(|c| !c.starts_with("--from")) {
        let src = copy.split_whitespace().next().unwrap();
        if src != "." {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(src).exists(),
                "COPY source {src} missing"
            );
        }
    }
}

#[test]
fn compose_file_runs_on_the_host_network_with_net_admin_and_tun() {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read("docker-compose.yml")).expect("valid YAML");
    let svc = &doc["services"]["wayfinder"];
    assert_eq!(svc["network_mode"].as_str(), Some("host"));
    let caps: Vec<&str> = svc["cap_add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(caps.contains(&"NET_ADMIN"), "{caps:?}");
    let devices: Vec<&str> = svc["devices"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(devices.iter().any(|d| d.starts_with("/dev/net/tun")), "{devices:?}");
    assert_eq!(svc["build"]["dockerfile"].as_str(), Some("deploy/Dockerfile"));
    assert!(
        deploy()
            .join(svc["build"]["context"].as_str().unwrap())
            .join("deploy/Dockerfile")
            .exists()
    );
    let env_files: Vec<&str> = svc["env_file"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        env_files.iter().any(|f| f.ends_with("restricted/host")),
        "{env_files:?}"
    );
    assert!(
        svc["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains(":/var/lib/wayfinder")))
    );
}

/// KEY=VALUE lines (values may be double-quoted, as PanteraS wrote them).
fn host_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "bad key {k}"
            );
            // As `docker run --env-file` and compose v1 pass it: quotes kept.
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// `wayfinder check -c deploy/<file>` with exactly these variables.
fn check(file: &str, vars: &[(String, String)]) -> (bool, String, String) {
    let mut cmd = Command::new(wayfinder_bin());
    cmd.args(["check", "-c"]).arg(deploy().join(file));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (var, _) in wayfinder::env::VARS {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn restricted_host_examples_use_only_wayfinder_variables_and_give_their_roles() {
    let known: Vec<&str> = wayfinder::env::VARS.iter().map(|(v, _)| *v).collect();
    let cases = [
        ("restricted/standalone/host", "standalone (master + slave)", true),
        ("restricted/cluster/master-1/host", "standalone (master + slave)", true),
        ("restricted/cluster/master-2/host", "standalone (master + slave)", true),
        ("restricted/cluster/master-3/host", "standalone (master + slave)", true),
        ("restricted/cluster/slave/host", "slave", false),
    ];
    for (file, role, server) in cases {
        let vars = host_file(&read(file));
        for (k, _) in &vars {
            assert!(
                known.contains(&k.as_str()),
                "{file}: {k} is not a variable Wayfinder reads"
            );
        }
        // `check` validates without binding, so the example addresses need not
        // be this machine's.
        let (ok, out, err) = check("appliance.toml", &vars);
        assert!(ok, "{file}: {err}");
        assert!(out.contains(&format!("# role: {role} ")), "{file}: {out}");
        assert!(
            out.contains("starts consul") && out.contains("starts dns") && out.contains("starts lb"),
            "{file}: {out}"
        );
        assert_eq!(out.contains("server (master)"), server, "{file}: {out}");
        if file.contains("cluster") {
            assert!(
                vars.iter()
                    .any(|(k, v)| k == "CONSUL_HOSTS" && v.matches("-join=").count() == 3),
                "{file}"
            );
        }
    }
    let master1 = host_file(&read("restricted/cluster/master-1/host"));
    assert!(master1.contains(&("CONSUL_PARAMS".into(), "\"-bootstrap-expect 3\"".into())));
    // The standalone example works on any host: no address of another machine.
    let standalone = host_file(&read("restricted/standalone/host"));
    for (k, _) in &standalone {
        assert!(
            !["IP", "HOST_IP", "LISTEN_IP", "CONSUL_IP"].contains(&k.as_str()),
            "restricted/standalone/host sets {k}: it would only work on the machine that has that address"
        );
    }
    let master2 = host_file(&read("restricted/cluster/master-2/host"));
    assert!(
        !master2.iter().any(|(k, _)| k == "CONSUL_PARAMS"),
        "only one master bootstraps"
    );
}

#[test]
fn marathon_plans_parse_and_carry_service_tags() {
    let dir = deploy().join("marathon");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(plan["id"].as_str().is_some_and(|i| !i.is_empty()), "{name}: id");
        assert!(plan["instances"].as_u64().is_some(), "{name}: instances");
        assert_eq!(plan["container"]["type"], "DOCKER", "{name}");
        assert!(
            plan["container"]["docker"]["portMappings"]
                .as_array()
                .is_some_and(|p| !p.is_empty()),
            "{name}: a mapped port for registrator"
        );
        let tags = plan["env"]["SERVICE_TAGS"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: SERVICE_TAGS"));
        assert!(plan["env"]["SERVICE_NAME"].as_str().is_some(), "{name}: SERVICE_NAME");
        for tag in tags.split(',') {
            let ok = tag == "haproxy"
                || ["haproxy_weight=", "haproxy_route=/", "haproxy_tcp=", "haproxy_httpchk="]
                    .iter()
                    .any(|p| tag.starts_with(p));
            assert!(ok, "{name}: unknown tag {tag}");
        }
        seen.push(tags.to_string());
    }
    for want in ["haproxy_weight=1", "haproxy_route=", "haproxy_tcp=", "haproxy_httpchk="] {
        assert!(
            seen.iter().any(|t| t.contains(want)),
            "no example with {want}: {seen:?}"
        );
    }
}

#[test]
fn every_deploy_toml_passes_check() {
    let mut files: Vec<String> = std::fs::read_dir(deploy())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let (ok, out, err) = check(&file, &[]);
        assert!(
            ok && out.ends_with("configuration ok\n"),
            "deploy/{file} fails `wayfinder check` (it uses this machine's resolv.conf for upstreams):\n{err}"
        );
    }
}
