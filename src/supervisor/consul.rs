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

/// What a flag of `consul agent` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// Nothing: `-ui` (or `-ui=true`).
    Nothing,
    /// Any non-empty value.
    Value,
    /// A host name or address, optionally with a port (or a go-discover
    /// `provider=...` for the retry joins).
    Host,
    /// A whole number.
    Number,
    /// A Go duration: `30s`, `1m30s`.
    Duration,
}

/// The flags of `consul agent` (1.8.7, `consul agent -h`).
const AGENT_FLAGS: &[(&str, Takes)] = &[
    ("advertise", Takes::Value),
    ("advertise-wan", Takes::Value),
    ("allow-write-http-from", Takes::Value),
    ("alt-domain", Takes::Value),
    ("bind", Takes::Value),
    ("bootstrap", Takes::Nothing),
    ("bootstrap-expect", Takes::Number),
    ("check_output_max_size", Takes::Number),
    ("client", Takes::Value),
    ("config-dir", Takes::Value),
    ("config-file", Takes::Value),
    ("config-format", Takes::Value),
    ("data-dir", Takes::Value),
    ("datacenter", Takes::Value),
    ("default-query-time", Takes::Duration),
    ("dev", Takes::Nothing),
    ("disable-host-node-id", Takes::Nothing),
    ("disable-keyring-file", Takes::Nothing),
    ("dns-port", Takes::Number),
    ("domain", Takes::Value),
    ("enable-local-script-checks", Takes::Nothing),
    ("enable-script-checks", Takes::Nothing),
    ("encrypt", Takes::Value),
    ("grpc-port", Takes::Number),
    ("hcl", Takes::Value),
    ("http-port", Takes::Number),
    ("https-port", Takes::Number),
    ("join", Takes::Host),
    ("join-wan", Takes::Host),
    ("log-file", Takes::Value),
    ("log-json", Takes::Nothing),
    ("log-level", Takes::Value),
    ("log-rotate-bytes", Takes::Number),
    ("log-rotate-duration", Takes::Duration),
    ("log-rotate-max-files", Takes::Number),
    ("max-query-time", Takes::Duration),
    ("node", Takes::Value),
    ("node-id", Takes::Value),
    ("node-meta", Takes::Value),
    ("non-voting-server", Takes::Nothing),
    ("pid-file", Takes::Value),
    ("primary-gateway", Takes::Host),
    ("protocol", Takes::Number),
    ("raft-protocol", Takes::Number),
    ("recursor", Takes::Host),
    ("rejoin", Takes::Nothing),
    ("retry-interval", Takes::Duration),
    ("retry-interval-wan", Takes::Duration),
    ("retry-join", Takes::Host),
    ("retry-join-wan", Takes::Host),
    ("retry-max", Takes::Number),
    ("retry-max-wan", Takes::Number),
    ("segment", Takes::Value),
    ("serf-lan-allowed-cidrs", Takes::Value),
    ("serf-lan-bind", Takes::Value),
    ("serf-lan-port", Takes::Number),
    ("serf-wan-allowed-cidrs", Takes::Value),
    ("serf-wan-bind", Takes::Value),
    ("serf-wan-port", Takes::Number),
    ("server", Takes::Nothing),
    ("server-port", Takes::Number),
    ("syslog", Takes::Nothing),
    ("ui", Takes::Nothing),
    ("ui-content-path", Takes::Value),
    ("ui-dir", Takes::Value),
];

/// `value` split into words as supervisord split PanteraS's command line
/// (`consul agent ... $CONSUL_PARAMS`): at blanks, with `'...'` and `"..."`
/// grouping (and removed) and `\` escaping one character.
fn split_words(value: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some(x) if x == c => break,
                        Some('\\') if c == '"' => w.extend(chars.next()),
                        Some(x) => w.push(x),
                        None => return Err(format!("a {c} quote is not closed")),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Whether `text` is a host name, an IP address, either with a `:port`, or a
/// bracketed IPv6 address with one.
fn is_host(text: &str) -> bool {
    if text.parse::<IpAddr>().is_ok() || text.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let name = match text.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => text,
    };
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label)
}

/// Whether `text` is a Go duration (`30s`, `1m30s`, `500ms`).
fn is_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 || rest[..digits].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len())
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// Why `value` is not what `flag` takes, if it is not.
fn bad_value(flag: &str, takes: Takes, value: &str) -> Option<String> {
    let ok = match takes {
        Takes::Nothing => matches!(value, "true" | "false" | "1" | "0"),
        Takes::Value => !value.trim().is_empty(),
        Takes::Host => is_host(value) || (flag.starts_with("retry-join") && value.starts_with("provider=")),
        Takes::Number => value.parse::<u64>().is_ok(),
        Takes::Duration => is_duration(value),
    };
    if ok {
        return None;
    }
    let what = match takes {
        Takes::Nothing => "nothing, or true/false",
        Takes::Value => "a value",
        Takes::Host => "a host name or address (optionally :port)",
        Takes::Number => "a whole number",
        Takes::Duration => "a duration such as 30s",
    };
    Some(if value.is_empty() {
        format!("-{flag} is empty: it takes {what}")
    } else {
        format!("-{flag} takes {what}, not `{value}`")
    })
}

/// `CONSUL_HOSTS` or `CONSUL_PARAMS` (named `var`) as agent arguments, checked
/// as `consul agent` 1.8 would: every flag one it knows with a value of the
/// right kind. `CONSUL_HOSTS` may also hold bare host names (each a join).
/// A problem is a configuration error naming the variable, so a word Consul
/// would refuse stops `check` and `up` (exit 64) instead of a Consul unit that
/// crash-loops into `failed`.
pub fn agent_words(var: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let error = |problem: String| ConfigError {
        file: "environment".into(),
        key: var.into(),
        problem,
    };
    let words = split_words(value).map_err(|p| error(format!("{p} in `{value}`")))?;
    let hosts = var == crate::env::CONSUL_HOSTS;
    let mut iter = words.iter().peekable();
    while let Some(word) = iter.next() {
        let Some(flag) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
            if hosts {
                if !is_host(word) {
                    return Err(error(format!("`{word}` is neither a flag nor a host name or address")));
                }
                continue;
            }
            return Err(error(format!(
                "`{word}` is not a flag (-name or -name=value) nor the value of one"
            )));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        let Some(&(_, takes)) = AGENT_FLAGS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<String> = AGENT_FLAGS.iter().map(|(n, _)| format!("-{n}")).collect();
            return Err(error(format!(
                "`{word}` is not a flag of consul agent (1.8); it knows {}",
                known.join(" ")
            )));
        };
        let value = match (inline, takes) {
            (Some(v), _) => v.to_string(),
            (None, Takes::Nothing) => continue,
            (None, _) => match iter.next() {
                Some(v) => v.clone(),
                None => return Err(error(format!("-{name} is missing its value"))),
            },
        };
        if let Some(problem) = bad_value(name, takes, &value) {
            return Err(error(problem));
        }
    }
    Ok(words)
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

    #[test]
    fn agent_words_accept_what_consul_takes() {
        for (var, value) in [
            ("CONSUL_HOSTS", "-join=10.0.0.11 -join=10.0.0.12"),
            (
                "CONSUL_HOSTS",
                "--join=master-1.example.com -join master-2 master-3:8301",
            ),
            ("CONSUL_HOSTS", "-retry-join=[fd00::1]:8301 -retry-join=fd00::2"),
            ("CONSUL_HOSTS", "-retry-join 'provider=aws tag_key=consul tag_value=x'"),
            ("CONSUL_PARAMS", "-bootstrap-expect 3"),
            (
                "CONSUL_PARAMS",
                "-bootstrap-expect=3 -ui -server=true -retry-interval 30s",
            ),
            (
                "CONSUL_PARAMS",
                "-advertise 10.0.0.5 -encrypt=pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=",
            ),
            (
                "CONSUL_PARAMS",
                "-recursor 8.8.8.8 -recursor=1.1.1.1:53 -serf-lan-port 18301",
            ),
            (
                "CONSUL_PARAMS",
                "-bind '{{ GetInterfaceIP \"eth0\" }}' -log-rotate-duration 1h30m",
            ),
            ("CONSUL_PARAMS", ""),
        ] {
            agent_words(var, value).unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
    }

    #[test]
    fn agent_words_reject_what_consul_would_naming_the_variable() {
        for (var, value, needle) in [
            ("CONSUL_HOSTS", "\"-join=10.0.0.1 -join=10.0.0.2", "quote is not closed"),
            ("CONSUL_PARAMS", "-bootstrap-expect '3", "quote is not closed"),
            ("CONSUL_HOSTS", "-join=", "-join is empty"),
            ("CONSUL_HOSTS", "-join=10.0.0.1 -join", "-join is missing its value"),
            ("CONSUL_HOSTS", "-join=\"10.0.0.1", "quote is not closed"),
            ("CONSUL_HOSTS", "-join=m1 m2!", "`m2!` is neither a flag nor a host"),
            ("CONSUL_HOSTS", "-join=host_name", "-join takes a host name or address"),
            ("CONSUL_HOSTS", "-join=bad..name", "-join takes a host name or address"),
            ("CONSUL_HOSTS", "-join=-x", "-join takes a host name or address"),
            ("CONSUL_HOSTS", "10.0.0.1,10.0.0.2", "neither a flag nor a host"),
            (
                "CONSUL_PARAMS",
                "bootstrap-expect 3",
                "`bootstrap-expect` is not a flag",
            ),
            (
                "CONSUL_PARAMS",
                "-bootstrap-expct 3",
                "`-bootstrap-expct` is not a flag of consul agent",
            ),
            (
                "CONSUL_PARAMS",
                "-bootstrap-expect three",
                "-bootstrap-expect takes a whole number",
            ),
            (
                "CONSUL_PARAMS",
                "-retry-interval 30",
                "-retry-interval takes a duration",
            ),
            ("CONSUL_PARAMS", "-ui yes", "`yes` is not a flag"),
            ("CONSUL_PARAMS", "-ui=yes", "-ui takes nothing"),
            ("CONSUL_PARAMS", "-recursor=dns!", "-recursor takes a host"),
        ] {
            let e = agent_words(var, value).expect_err(value);
            assert_eq!(e.key, var);
            assert!(e.problem.contains(needle), "{var}={value}: {e}");
        }
        let e = agent_words("CONSUL_PARAMS", "-bootstrap-expct 3").unwrap_err();
        for known in [
            "-bootstrap-expect",
            "-retry-join",
            "-advertise",
            "-encrypt",
            "-ui",
            "-serf-lan-port",
        ] {
            assert!(e.problem.contains(known), "the known flags are listed: {e}");
        }
    }
}
