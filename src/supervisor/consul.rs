//! The built-in `consul` program: a Consul agent command line derived from the
//! PanteraS settings, so a `restricted/host` file keeps meaning what it meant.
//!
//! ```text
//!  [consul] http/dns ports, CONSUL_IP, CONSUL_DC, CONSUL_DOMAIN ─┐
//!  HOST_IP / [supervisor.consul] bind, node, data_dir, ui ───────┼─▶ ProgramConfig
//!  role: server on masters, client elsewhere ────────────────────┤    (consul agent ...)
//!  CONSUL_HOSTS (-join=...), CONSUL_PARAMS, extra_args ──────────┘
//! ```
//!
//! A standalone host (a master that joins nobody and was given no bootstrap
//! setting) becomes a single-node server with `-bootstrap-expect 1`.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::UpConfig;
use super::consul_words::{AGENT_FLAGS, Takes};
use super::roles::{ConsulMode, Plan, UnitKind};
use super::settings::{ProgramConfig, RestartPolicy};
use crate::config::shared::ConfigError;
use crate::env::Env;

/// How to get Consul, for the error when it is missing.
pub const CONSUL_INSTALL: &str = "install Consul (`scripts/install-deps.sh` does, from Debian bullseye), \
     or set supervisor.consul.command to its path; with a Consul agent that runs elsewhere, \
     START_CONSUL=false";

/// The search path `execvp` uses when `PATH` is unset (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// How long Consul gets after SIGTERM before SIGKILL (it flushes its raft log).
const CONSUL_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The host name, for `-node`.
fn hostname() -> String {
    crate::net::host::name().unwrap_or_else(|| "wayfinder".into())
}

/// The address Consul binds its cluster ports to.
fn bind_address(config: &UpConfig) -> Option<IpAddr> {
    let http = config.consul.http.ip();
    config
        .supervisor
        .consul
        .bind
        .or(config.host_ip)
        .or((!http.is_unspecified()).then_some(http))
}

/// `CONSUL_HOSTS` words as agent arguments. PanteraS wrote `-join=HOST`, which
/// makes an agent exit when no host answers at start; here each becomes
/// `-retry-join=HOST` instead, so hosts may come up in any order (the agent keeps
/// trying, every two seconds, rather than crash-looping into `failed`). Bare host
/// names are accepted too. The words are [`agent_words`]' checked ones.
fn join_args(words: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut iter = words.iter();
    while let Some(w) = iter.next() {
        let host = if let Some(h) = w.strip_prefix("-join=").or_else(|| w.strip_prefix("--join=")) {
            Some(h.to_string())
        } else if w == "-join" || w == "--join" {
            iter.next().cloned()
        } else if !w.starts_with('-') {
            Some(w.clone())
        } else {
            // Another flag (`-retry-join=x`, `-join-wan x`): passed on as
            // written, with its value when that is the next word.
            out.push(w.clone());
            let name = w.trim_start_matches('-');
            let takes = AGENT_FLAGS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
            if takes.is_some_and(|t| t != Takes::Nothing) {
                out.extend(iter.next().cloned());
            }
            None
        };
        if let Some(h) = host {
            out.push(format!("-retry-join={h}"));
        }
    }
    if !out.is_empty() {
        out.push("-retry-interval=2s".into());
    }
    out
}

/// Where `command` is run from: itself when it names a path (has a `/`), else
/// the first executable file of that name in `path` (a `PATH` value), as
/// `execvp` looks it up.
pub fn find_executable(command: &Path, path: Option<&str>) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if command.components().count() > 1 || command.is_absolute() {
        return executable(command).then(|| command.to_path_buf());
    }
    std::env::split_paths(path.unwrap_or(DEFAULT_PATH))
        .map(|dir| dir.join(command))
        .find(|p| executable(p))
}

/// When `plan` starts the built-in Consul agent, its command must exist: a
/// missing one is a configuration error at start (exit 64, naming the install
/// step), not a unit that crash-loops into `failed` with every other unit
/// waiting for a leader that never comes.
pub fn require_command(config: &UpConfig, plan: &Plan, env: &dyn Env) -> Result<(), ConfigError> {
    if !plan.starting().any(|u| matches!(u.kind, UnitKind::Consul(_))) {
        return Ok(());
    }
    let command = &config.supervisor.consul.command;
    if find_executable(command, env.get("PATH").as_deref()).is_some() {
        return Ok(());
    }
    let whence = if command.components().count() > 1 || command.is_absolute() {
        "is not an executable file"
    } else {
        "is not in PATH"
    };
    Err(ConfigError {
        file: config.source.clone(),
        key: "supervisor.consul.command".into(),
        problem: format!(
            "up starts a Consul agent, but `{}` {whence}: {CONSUL_INSTALL}",
            command.display()
        ),
    })
}

/// The built-in agent as a program.
pub fn program(config: &UpConfig, plan: &Plan, mode: ConsulMode) -> ProgramConfig {
    let settings = &config.supervisor.consul;
    let mut args: Vec<String> = vec!["agent".into()];
    let mut push = |flag: &str, value: String| {
        args.push(flag.into());
        args.push(value);
    };
    push("-node", settings.node.clone().unwrap_or_else(hostname));
    push("-data-dir", settings.data_dir.display().to_string());
    if let Some(ip) = bind_address(config) {
        push("-bind", ip.to_string());
    }
    push("-client", config.consul.http.ip().to_string());
    push("-http-port", config.consul.http.port().to_string());
    if let Some(dns) = config.consul.dns.first() {
        push("-dns-port", dns.port().to_string());
    }
    push("-datacenter", config.consul.datacenter.clone());
    push(
        "-domain",
        config.consul.domain.to_string().trim_end_matches('.').to_string(),
    );
    // TC instead of silently trimmed answers (the dns component retries over
    // TCP); an appliance has no business phoning home for updates; raft timing
    // as Consul recommends for production servers (its default multiplier of 5
    // is for slow machines and makes every election take seconds).
    push(
        "-hcl",
        "dns_config { enable_truncate = true } disable_update_check = true performance { raft_multiplier = 1 }".into(),
    );
    if mode == ConsulMode::Server {
        args.push("-server".into());
        let bootstraps = plan
            .consul_params
            .iter()
            .chain(&settings.extra_args)
            .any(|a| a.starts_with("-bootstrap"));
        if plan.consul_hosts.is_empty() && !bootstraps {
            args.extend(["-bootstrap-expect".into(), "1".into()]);
        }
    }
    if settings.ui {
        args.push("-ui".into());
    }
    args.extend(join_args(&plan.consul_hosts));
    args.extend(plan.consul_params.iter().cloned());
    args.extend(settings.extra_args.iter().cloned());
    ProgramConfig {
        name: "consul".into(),
        command: settings.command.clone(),
        args,
        env: Default::default(),
        dir: None,
        autostart: true,
        priority: 10,
        restart: RestartPolicy::Always,
        stop_signal: libc::SIGTERM,
        stop_timeout: CONSUL_STOP_TIMEOUT,
        needs_consul: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::roles::plan;
    use std::collections::HashMap;

    fn build(vars: &[(&str, &str)], extra: &str) -> Vec<String> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let text = format!("[dns]\nupstreams = [\"192.0.2.1\"]\n{extra}");
        let (file, host_ip) = crate::config::parse_with_host(&text, "t.toml", &env).unwrap();
        let mut config = crate::config::validate(&file, "t.toml").unwrap();
        config.host_ip = host_ip;
        let p = plan(&env, &config).unwrap();
        let crate::supervisor::roles::UnitKind::Consul(mode) = p.units[0].kind else {
            panic!("consul first")
        };
        program(&super::super::UpConfig::of(&config), &p, mode).args
    }

    fn has(args: &[String], pair: &[&str]) -> bool {
        args.windows(pair.len()).any(|w| w == pair)
    }

    #[test]
    fn standalone_is_a_single_node_server() {
        let a = build(&[], "[supervisor.consul]\nnode = \"n1\"\n");
        assert_eq!(a[0], "agent");
        for pair in [
            &["-node", "n1"][..],
            &["-data-dir", "consul-data"],
            &["-bind", "127.0.0.1"],
            &["-client", "127.0.0.1"],
            &["-http-port", "8500"],
            &["-dns-port", "8600"],
            &["-datacenter", "dc1"],
            &["-domain", "consul"],
            &["-bootstrap-expect", "1"],
        ] {
            assert!(has(&a, pair), "{pair:?} in {a:?}");
        }
        assert!(a.contains(&"-server".to_string()) && a.contains(&"-ui".to_string()));
        assert!(a.iter().any(|x| x.contains("enable_truncate = true")));
    }

    #[test]
    fn panteras_cluster_settings() {
        let vars = [
            ("CONSUL_IP", "10.0.0.1"),
            ("HOST_IP", "10.0.0.1"),
            ("CONSUL_DC", "eu1"),
            ("CONSUL_DOMAIN", "disco"),
            ("CONSUL_HOSTS", "-join=m1 -join=m2 -join m3"),
            ("CONSUL_PARAMS", "-bootstrap-expect 3"),
        ];
        let a = build(&vars, "");
        for pair in [
            &["-bind", "10.0.0.1"][..],
            &["-client", "10.0.0.1"],
            &["-datacenter", "eu1"],
            &["-domain", "disco"],
            &["-bootstrap-expect", "3"],
        ] {
            assert!(has(&a, pair), "{pair:?} in {a:?}");
        }
        for host in ["m1", "m2", "m3"] {
            assert!(a.contains(&format!("-retry-join={host}")), "{a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("-join")), "{a:?}");
        assert_eq!(a.iter().filter(|x| *x == "-bootstrap-expect").count(), 1, "{a:?}");

        // A master that joins others without CONSUL_PARAMS does not bootstrap itself.
        let a = build(&[("CONSUL_HOSTS", "-join=m1")], "");
        assert!(a.contains(&"-server".to_string()) && !a.contains(&"-bootstrap-expect".to_string()));

        // A slave-only host runs a client agent.
        let a = build(&[("MASTER", "false"), ("CONSUL_HOSTS", "m1 m2")], "");
        assert!(!a.contains(&"-server".to_string()), "{a:?}");
        assert!(a.contains(&"-retry-join=m2".to_string()), "{a:?}");

        // extra_args come last so they win.
        let a = build(
            &[],
            "[supervisor.consul]\nextra_args = [\"-serf-lan-port\", \"18301\"]\n",
        );
        assert_eq!(&a[a.len() - 2..], ["-serf-lan-port", "18301"]);
    }

    #[test]
    fn a_missing_consul_command_is_found_out_before_start() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("consul");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        let path = dir.path().display().to_string();
        let found = find_executable(Path::new("consul"), Some(&format!("/nonexistent:{path}")));
        assert_eq!(found, None, "a file without an execute bit is no program");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_executable(Path::new("consul"), Some(&path)).as_deref(),
            Some(bin.as_path())
        );
        assert_eq!(find_executable(&bin, None).as_deref(), Some(bin.as_path()));
        assert_eq!(find_executable(Path::new("consul"), Some("/nonexistent")), None);
        assert_eq!(find_executable(&dir.path().join("nope"), Some(&path)), None);

        let config = |extra: &str, vars: &[(&str, &str)]| {
            let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let text = format!("[dns]\nupstreams = [\"192.0.2.1\"]\n{extra}");
            let file = crate::config::parse(&text, "t.toml", &env).unwrap();
            let config = crate::config::validate(&file, "t.toml").unwrap();
            let p = plan(&env, &config).unwrap();
            require_command(&super::super::UpConfig::of(&config), &p, &env)
        };
        let e = config("", &[("PATH", "/nonexistent")]).unwrap_err();
        assert_eq!(e.key, "supervisor.consul.command");
        assert!(
            e.problem.contains("`consul` is not in PATH") && e.problem.contains("scripts/install-deps.sh"),
            "{e}"
        );
        config("", &[("PATH", &path)]).unwrap();
        // Not started: nothing to find.
        config("", &[("PATH", "/nonexistent"), ("START_CONSUL", "false")]).unwrap();
        config("[supervisor.consul]\nenabled = false\n", &[("PATH", "/nonexistent")]).unwrap();
        let e = config("[supervisor.consul]\ncommand = \"/opt/consul/bin/consul\"\n", &[]).unwrap_err();
        assert!(
            e.problem.contains("`/opt/consul/bin/consul` is not an executable file"),
            "{e}"
        );
    }

    /// What `docker run --env-file` hands over for `KEY=raw`, read as the
    /// process environment reads it.
    fn env_file(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .filter_map(|(k, raw)| Some((k.to_string(), crate::env::process_value(k, raw.to_string())?)))
            .collect()
    }

    #[test]
    fn quoted_consul_hosts_from_an_env_file_reach_the_agent_as_separate_arguments() {
        let vars = env_file(&[
            ("CONSUL_HOSTS", "\"-join=10.0.0.11 -join=10.0.0.12 -join=10.0.0.13\""),
            ("CONSUL_PARAMS", "\"-bootstrap-expect 3\""),
        ]);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let a = build(&vars, "");
        let joins: Vec<&String> = a.iter().filter(|x| x.contains("join")).collect();
        assert_eq!(
            joins,
            [
                "-retry-join=10.0.0.11",
                "-retry-join=10.0.0.12",
                "-retry-join=10.0.0.13"
            ],
            "{a:?}"
        );
        assert!(has(&a, &["-bootstrap-expect", "3"]), "{a:?}");
        assert!(!a.iter().any(|x| x.contains('"')), "no quote reaches Consul: {a:?}");

        // Quotes inside CONSUL_PARAMS group a word, as supervisord split it.
        let a = build(&[("CONSUL_PARAMS", "-node-meta 'rack:r 1' -retry-join m9")], "");
        assert!(has(&a, &["-node-meta", "rack:r 1"]), "{a:?}");
        // A flag written apart from its value keeps it, in CONSUL_HOSTS too.
        let a = build(&[("CONSUL_HOSTS", "-retry-join m1 -join m2 m3")], "");
        assert!(has(&a, &["-retry-join", "m1"]), "{a:?}");
        assert!(
            a.contains(&"-retry-join=m2".into()) && a.contains(&"-retry-join=m3".into()),
            "{a:?}"
        );
        assert!(!a.contains(&"-retry-join=m1".into()), "{a:?}");
    }
}
