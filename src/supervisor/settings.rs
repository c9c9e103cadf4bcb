//! `[supervisor]` of the config file: the raw section ([`SupervisorSection`],
//! serde, unknown keys rejected) and its validated form ([`SupervisorConfig`]),
//! built by [`validate_supervisor`] from `config::validate`.
//!
//! ```text
//!  [supervisor] admin, token, restart settings ─┐
//!  [supervisor.consul] the built-in agent ──────┼─▶ SupervisorConfig ─▶ roles::plan
//!  [[supervisor.program]] external programs ────┘
//! ```
//!
//! Lives beside the supervisor rather than in `config.rs` so that the shared file
//! only gains one field and one call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::shared::ConfigError;

/// `[supervisor]`: what `wayfinder up` runs and how it restarts things.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSection {
    /// Admin endpoint (JSON API, actions, `/metrics`, the status page). Default
    /// `127.0.0.1:9000`; `""` turns it off. `LISTEN_IP` does not move it: the
    /// admin endpoint leaves loopback only when asked to, and then needs `token`.
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Bearer token the admin endpoint requires (`Authorization: Bearer <token>`,
    /// or `?token=` for a browser). Required when `admin` is not a loopback
    /// address. Default none; `WAYFINDER_ADMIN_TOKEN` overrides.
    #[serde(default)]
    pub token: String,
    /// Upper bound of the restart backoff, which starts at 100 ms and doubles.
    /// Default `30s`.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// A program or component that stays up this long has its backoff reset.
    /// Default `10s`.
    #[serde(default = "default_reset_after", with = "humantime_serde")]
    pub restart_reset_after: Duration,
    /// Failures within `failure_window` after which a program or component is
    /// marked `failed` and left stopped (the rest keep running). Default `5`.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// The window `max_failures` is counted in. Default `60s`.
    #[serde(default = "default_failure_window", with = "humantime_serde")]
    pub failure_window: Duration,
    /// How long components that need Consul (the lb) wait for the built-in agent
    /// to have a leader before they start anyway. Default `30s`.
    #[serde(default = "default_consul_wait", with = "humantime_serde")]
    pub consul_wait: Duration,
    /// The built-in Consul agent.
    #[serde(default)]
    pub consul: ConsulProgramSection,
    /// External programs, `[[supervisor.program]]`. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub program: Vec<ProgramSection>,
}

impl Default for SupervisorSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// `[supervisor.consul]`: the Consul agent `up` runs itself, derived from the
/// PanteraS settings (`CONSUL_IP`, `CONSUL_DC`, `CONSUL_DOMAIN`, `CONSUL_HOSTS`,
/// `CONSUL_PARAMS`). Its HTTP and DNS ports are those of `[consul]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulProgramSection {
    /// Run it. Default: by role (every host); `START_CONSUL` overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The consul executable (looked up in `PATH`). Default `consul`. When `up`
    /// starts the agent and it cannot be found, `up` exits 64 naming the install step.
    #[serde(default = "default_consul_command")]
    pub command: PathBuf,
    /// Persistent state (`-data-dir`), relative to the working directory.
    /// Default `consul-data`.
    #[serde(default = "default_consul_data_dir")]
    pub data_dir: PathBuf,
    /// Node name (`-node`). Default `""` = the host name.
    #[serde(default)]
    pub node: String,
    /// Cluster address (`-bind`). Default `""` = `HOST_IP`, else the address of
    /// `consul.http` when it is a real one, else 127.0.0.1.
    #[serde(default)]
    pub bind: String,
    /// Serve Consul's web UI on its HTTP port (`-ui`). Default `true`.
    #[serde(default = "default_true")]
    pub ui: bool,
    /// More agent arguments, after everything derived (later flags win in
    /// Consul's parser), e.g. `["-serf-lan-port", "18301"]`. Default none.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

impl Default for ConsulProgramSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// When a program that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status (supervisord's `autorestart=true`).
    Always,
    /// Only after a non-zero status or a signal.
    OnFailure,
    /// Never: it runs once.
    Never,
}

/// One `[[supervisor.program]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramSection {
    /// Name in logs, the status page and the admin API. Required; letters,
    /// digits, `-` and `_`.
    pub name: String,
    /// The executable (a path, or a name looked up in `PATH`). Required.
    pub command: PathBuf,
    /// Its arguments. Default none.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables (the rest is inherited). Default none.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory. Default: wayfinder's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Start it with `up`. Default `true` (`false`: only by an admin action).
    #[serde(default = "default_true")]
    pub autostart: bool,
    /// Start order, lowest first; stopped in reverse. The built-in units use
    /// consul 10, vpn 15, dns 20, lb 30. Default `100`.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// `always` (default), `on-failure` or `never`.
    #[serde(default = "default_restart")]
    pub restart: RestartPolicy,
    /// Signal that asks it to stop: `TERM` (default), `INT`, `QUIT`, `HUP`,
    /// `USR1`, `USR2` or `KILL`.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Time between the stop signal and SIGKILL. Default `10s`.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Start it only once the built-in Consul agent has a leader (bounded by
    /// `supervisor.consul_wait`), e.g. for registrator. Default `false`.
    #[serde(default)]
    pub needs_consul: bool,
}

fn default_admin() -> String {
    "127.0.0.1:9000".into()
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_reset_after() -> Duration {
    Duration::from_secs(10)
}
fn default_max_failures() -> u32 {
    5
}
fn default_failure_window() -> Duration {
    Duration::from_secs(60)
}
fn default_consul_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_consul_command() -> PathBuf {
    PathBuf::from("consul")
}
fn default_consul_data_dir() -> PathBuf {
    PathBuf::from("consul-data")
}
fn default_true() -> bool {
    true
}
fn default_priority() -> u32 {
    100
}
fn default_restart() -> RestartPolicy {
    RestartPolicy::Always
}
fn default_stop_signal() -> String {
    "TERM".into()
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(10)
}

/// When to restart, how fast, and when to give up (shared by programs and
/// components).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSettings {
    /// First backoff step (100 ms).
    pub backoff_initial: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Uptime that resets the backoff.
    pub reset_after: Duration,
    /// Failures in `window` that mark a unit failed.
    pub max_failures: u32,
    /// The failure-counting window.
    pub window: Duration,
}

/// Validated `[supervisor.consul]`.
#[derive(Debug, Clone)]
pub struct ConsulProgramConfig {
    /// File setting; `None` = by role.
    pub enabled: Option<bool>,
    /// Executable.
    pub command: PathBuf,
    /// `-data-dir`.
    pub data_dir: PathBuf,
    /// `-node`, if set.
    pub node: Option<String>,
    /// `-bind`, if set.
    pub bind: Option<std::net::IpAddr>,
    /// `-ui`.
    pub ui: bool,
    /// Extra arguments.
    pub extra_args: Vec<String>,
}

/// Validated `[[supervisor.program]]`.
#[derive(Debug, Clone)]
pub struct ProgramConfig {
    /// Unique name.
    pub name: String,
    /// Executable.
    pub command: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub dir: Option<PathBuf>,
    /// Started by `up`.
    pub autostart: bool,
    /// Start order.
    pub priority: u32,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Stop signal number.
    pub stop_signal: i32,
    /// Stop signal to SIGKILL.
    pub stop_timeout: Duration,
    /// Waits for the built-in Consul's leader before its first start.
    pub needs_consul: bool,
}

/// Validated `[supervisor]`.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Admin endpoint, unless off.
    pub admin: Option<SocketAddr>,
    /// Bearer token, when set.
    pub token: Option<String>,
    /// Restart behaviour of every unit.
    pub restart: RestartSettings,
    /// Wait for the built-in Consul's leader.
    pub consul_wait: Duration,
    /// The built-in Consul agent.
    pub consul: ConsulProgramConfig,
    /// External programs in the order written.
    pub programs: Vec<ProgramConfig>,
}

/// Names the supervisor uses for its own units; programs may not take them.
pub const BUILT_IN_UNITS: [&str; 4] = ["consul", "dns", "lb", "vpn"];

/// A signal name (`TERM`, `SIGTERM`) as its number.
pub fn parse_signal(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match bare {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "KILL" => libc::SIGKILL,
        _ => return None,
    })
}

fn is_unit_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks `[supervisor]` and builds its validated form; `err` names the file.
///
/// Long on purpose: one check per field, in the section's order, over an
/// exhaustive destructuring (a new field cannot be forgotten); split, the
/// checks would stand apart from the fields they read.
pub fn validate_supervisor(
    section: &SupervisorSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<SupervisorConfig, ConfigError> {
    let SupervisorSection {
        admin,
        token,
        restart_backoff_max,
        restart_reset_after,
        max_failures,
        failure_window,
        consul_wait,
        consul,
        program,
    } = section;
    let admin = match admin.trim() {
        "" => None,
        text => Some(text.parse::<SocketAddr>().map_err(|e| {
            err(
                "supervisor.admin",
                format!("`{text}` is not an address with a port: {e}"),
            )
        })?),
    };
    let token = Some(token.trim().to_string()).filter(|t| !t.is_empty());
    if let Some(addr) = admin
        && !addr.ip().is_loopback()
        && token.is_none()
    {
        return Err(err(
            "supervisor.token",
            format!(
                "the admin endpoint {addr} is reachable from other hosts: set supervisor.token \
                 (or WAYFINDER_ADMIN_TOKEN), or bind it to 127.0.0.1"
            ),
        ));
    }
    if let Some(t) = &token
        && (t.len() < 8 || t.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(err(
            "supervisor.token",
            "must be at least 8 characters without spaces".into(),
        ));
    }
    for (key, d) in [
        ("supervisor.restart_backoff_max", restart_backoff_max),
        ("supervisor.failure_window", failure_window),
    ] {
        if d.is_zero() {
            return Err(err(key, "must be longer than 0s".into()));
        }
    }
    if *max_failures == 0 {
        return Err(err("supervisor.max_failures", "must be at least 1".into()));
    }

    let ConsulProgramSection {
        enabled,
        command,
        data_dir,
        node,
        bind,
        ui,
        extra_args,
    } = consul;
    let node = Some(node.trim().to_string()).filter(|n| !n.is_empty());
    let bind = match bind.trim() {
        "" => None,
        text => Some(
            text.parse()
                .map_err(|e| err("supervisor.consul.bind", format!("`{text}` is not an IP address: {e}")))?,
        ),
    };
    if command.as_os_str().is_empty() {
        return Err(err(
            "supervisor.consul.command",
            "must name the consul executable".into(),
        ));
    }

    let mut programs = Vec::with_capacity(program.len());
    for (i, p) in program.iter().enumerate() {
        let ProgramSection {
            name,
            command,
            args,
            env,
            dir,
            autostart,
            priority,
            restart,
            stop_signal,
            stop_timeout,
            needs_consul,
        } = p;
        let key = |k: &str| format!("supervisor.program[{i}].{k}");
        if !is_unit_name(name) {
            return Err(err(
                &key("name"),
                format!("`{name}` is not a program name (letters, digits, `-`, `_`)"),
            ));
        }
        if BUILT_IN_UNITS.contains(&name.as_str()) {
            return Err(err(
                &key("name"),
                format!("`{name}` is a built-in unit of the supervisor; choose another name"),
            ));
        }
        if programs.iter().any(|q: &ProgramConfig| &q.name == name) {
            return Err(err(&key("name"), format!("`{name}` is used by two programs")));
        }
        if command.as_os_str().is_empty() {
            return Err(err(&key("command"), "must name an executable".into()));
        }
        let signal = parse_signal(stop_signal).ok_or_else(|| {
            err(
                &key("stop_signal"),
                format!("`{stop_signal}` is not one of TERM, INT, QUIT, HUP, USR1, USR2, KILL"),
            )
        })?;
        programs.push(ProgramConfig {
            name: name.clone(),
            command: command.clone(),
            args: args.clone(),
            env: env.clone(),
            dir: dir.clone(),
            autostart: *autostart,
            priority: *priority,
            restart: *restart,
            stop_signal: signal,
            stop_timeout: *stop_timeout,
            needs_consul: *needs_consul,
        });
    }

    Ok(SupervisorConfig {
        admin,
        token,
        restart: RestartSettings {
            backoff_initial: Duration::from_millis(100),
            backoff_max: *restart_backoff_max,
            reset_after: *restart_reset_after,
            max_failures: *max_failures,
            window: *failure_window,
        },
        consul_wait: *consul_wait,
        consul: ConsulProgramConfig {
            enabled: *enabled,
            command: command.clone(),
            data_dir: data_dir.clone(),
            node,
            bind,
            ui: *ui,
            extra_args: extra_args.clone(),
        },
        programs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<SupervisorConfig, ConfigError> {
        let section: SupervisorSection = toml::from_str(text).expect("parses");
        validate_supervisor(&section, &|key, problem| ConfigError {
            file: "test.toml".into(),
            key: key.into(),
            problem,
        })
    }

    #[test]
    fn defaults() {
        let c = validate("").unwrap();
        assert_eq!(c.admin, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(c.token, None);
        assert_eq!(c.restart.backoff_initial, Duration::from_millis(100));
        assert_eq!(c.restart.backoff_max, Duration::from_secs(30));
        assert_eq!(c.restart.max_failures, 5);
        assert_eq!(c.consul.data_dir, PathBuf::from("consul-data"));
        assert!(c.consul.ui && c.consul.enabled.is_none());
        assert!(c.programs.is_empty());
        assert_eq!(validate("admin = \"\"").unwrap().admin, None);
    }

    /// Non-loopback admin without a token is refused; with one it is fine.
    #[test]
    fn token_rule() {
        let e = validate("admin = \"0.0.0.0:9000\"").unwrap_err();
        assert_eq!(e.key, "supervisor.token", "{e}");
        let e = validate("admin = \"10.0.0.1:9000\"\ntoken = \"short\"").unwrap_err();
        assert_eq!(e.key, "supervisor.token", "{e}");
        let c = validate("admin = \"0.0.0.0:9000\"\ntoken = \"s3cret-token\"").unwrap();
        assert_eq!(c.token.as_deref(), Some("s3cret-token"));
        assert!(validate("admin = \"[::1]:9000\"").is_ok());
        let e = validate("admin = \"9000\"").unwrap_err();
        assert_eq!(e.key, "supervisor.admin");
    }

    #[test]
    fn programs_are_checked() {
        let ok = "[[program]]\nname = \"registrator\"\ncommand = \"/bin/sleep\"\nargs = [\"100\"]\n\
                  stop_signal = \"SIGINT\"\nrestart = \"on-failure\"\n";
        let c = validate(ok).unwrap();
        assert_eq!(c.programs[0].stop_signal, libc::SIGINT);
        assert_eq!(c.programs[0].restart, RestartPolicy::OnFailure);
        assert_eq!(c.programs[0].priority, 100);
        for (text, key) in [
            (
                "[[program]]\nname = \"lb\"\ncommand = \"x\"\n",
                "supervisor.program[0].name",
            ),
            (
                "[[program]]\nname = \"a b\"\ncommand = \"x\"\n",
                "supervisor.program[0].name",
            ),
            (
                "[[program]]\nname = \"a\"\ncommand = \"x\"\n[[program]]\nname = \"a\"\ncommand = \"y\"\n",
                "supervisor.program[1].name",
            ),
            (
                "[[program]]\nname = \"a\"\ncommand = \"x\"\nstop_signal = \"STOP\"\n",
                "supervisor.program[0].stop_signal",
            ),
        ] {
            let e = validate(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        assert!(
            toml::from_str::<SupervisorSection>("[[program]]\nname = \"a\"\ncommand = \"x\"\nbogus = 1\n").is_err()
        );
        assert!(toml::from_str::<SupervisorSection>("[consul]\nbogus = 1\n").is_err());
    }
}
