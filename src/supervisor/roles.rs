//! Host roles: which components and programs `wayfinder up` starts, as one pure
//! function of the environment and the configuration (PanteraS's
//! `generate_yml.sh` logic, unit-tested as a full matrix).
//!
//! ```text
//!  MASTER, SLAVE (default true, true = standalone)
//!  START_DNS|START_DNSMASQ, START_LB|START_CONSUL_TEMPLATE, START_VPN, START_CONSUL
//!  [supervisor.consul] enabled, [[supervisor.program]] autostart
//!        ──plan()──▶ Plan { units sorted by priority, each with start + why }
//! ```
//!
//! Defaults, as in PanteraS: dns on every host; the lb where `SLAVE=true`; the
//! Consul agent everywhere, as a server on masters and a client elsewhere; the vpn
//! only where asked for (`vpn.enabled = true`). An explicit `START_*` wins over
//! the file, which wins over the role.

use crate::components::{ComponentKind, RunsOn};
use crate::config::Config;
use crate::config::shared::{ConfigError, parse_bool};
use crate::env::{self, Env};

/// The mode of the built-in Consul agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsulMode {
    /// `-server` (masters).
    Server,
    /// A client agent (slave-only hosts).
    Client,
}

/// What a unit is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitKind {
    /// The built-in Consul agent.
    Consul(ConsulMode),
    /// An in-process component.
    Component(ComponentKind),
    /// `[[supervisor.program]]` number N.
    Program(usize),
}

/// One unit the role considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedUnit {
    /// Unit name (`consul`, `dns`, `lb`, `vpn`, or the program's).
    pub name: String,
    /// What it is.
    pub kind: UnitKind,
    /// Start order, lowest first.
    pub priority: u32,
    /// Whether `up` starts it.
    pub start: bool,
    /// Why (shown by `check` and the status page).
    pub why: String,
}

/// The host's role and everything `up` would start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `MASTER`.
    pub master: bool,
    /// `SLAVE`.
    pub slave: bool,
    /// `CONSUL_HOSTS`, split into words (quotes group) and checked.
    pub consul_hosts: Vec<String>,
    /// `CONSUL_PARAMS`, split into words (quotes group) and checked.
    pub consul_params: Vec<String>,
    /// Every unit, sorted by priority (stable: file order among equals).
    pub units: Vec<PlannedUnit>,
}

impl Plan {
    /// The units that start.
    pub fn starting(&self) -> impl Iterator<Item = &PlannedUnit> {
        self.units.iter().filter(|u| u.start)
    }

    /// True when the unit called `name` starts.
    pub fn starts(&self, name: &str) -> bool {
        self.starting().any(|u| u.name == name)
    }

    /// True when the built-in Consul agent starts.
    pub fn starts_consul(&self) -> bool {
        self.starting().any(|u| matches!(u.kind, UnitKind::Consul(_)))
    }

    /// A short description: `standalone (master + slave)`, `master`, ...
    pub fn role(&self) -> &'static str {
        match (self.master, self.slave) {
            (true, true) => "standalone (master + slave)",
            (true, false) => "master",
            (false, true) => "slave",
            (false, false) => "neither master nor slave",
        }
    }

    /// Text for `wayfinder check`: one line per unit.
    pub fn render(&self) -> String {
        let mut out = format!(
            "# role: {} (MASTER={}, SLAVE={})\n",
            self.role(),
            self.master,
            self.slave
        );
        for u in &self.units {
            let verb = if u.start { "starts" } else { "off   " };
            out.push_str(&format!("#   {verb} {:<14} {}\n", u.name, u.why));
        }
        out
    }
}

/// A boolean variable: `true|1|yes|on` or `false|0|no|off`; unset is `None`.
fn env_bool(env: &dyn Env, var: &str) -> Result<Option<bool>, ConfigError> {
    env.get(var)
        .map(|text| parse_bool(&text).map_err(|problem| ConfigError::env(var, problem)))
        .transpose()
}

/// The first of the variables that is set (a name and its PanteraS alias); both
/// set to different values is an error, since one of them would be ignored.
fn env_override(env: &dyn Env, var: &str, alias: Option<&str>) -> Result<Option<(bool, String)>, ConfigError> {
    let main = env_bool(env, var)?;
    let other = alias.map(|a| env_bool(env, a)).transpose()?.flatten();
    match (main, other, alias) {
        (Some(a), Some(b), Some(alias)) if a != b => Err(ConfigError {
            file: "environment".into(),
            key: var.into(),
            problem: format!("{var}={a} contradicts its alias {alias}={b}"),
        }),
        (Some(a), _, _) => Ok(Some((a, format!("{var}={a}")))),
        (None, Some(b), Some(alias)) => Ok(Some((b, format!("{alias}={b}")))),
        _ => Ok(None),
    }
}

/// Decides what `up` starts on this host.
pub fn plan(env: &dyn Env, config: &Config) -> Result<Plan, ConfigError> {
    let master = env_bool(env, env::MASTER)?.unwrap_or(true);
    let slave = env_bool(env, env::SLAVE)?.unwrap_or(true);
    let words = |var: &str| -> Result<Vec<String>, ConfigError> {
        env.get(var)
            .map(|v| super::consul_words::agent_words(var, &v))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let mut units = Vec::new();

    // The Consul agent: everywhere unless turned off.
    let mode = if master { ConsulMode::Server } else { ConsulMode::Client };
    let mode_text = match mode {
        ConsulMode::Server => "server (master)",
        ConsulMode::Client => "client (not a master)",
    };
    let (start, why) = match (env_bool(env, env::START_CONSUL)?, config.supervisor.consul.enabled) {
        (Some(on), _) => (on, format!("START_CONSUL={on}")),
        (None, Some(on)) => (on, format!("supervisor.consul.enabled = {on}")),
        (None, None) => (true, "every host runs a Consul agent".to_string()),
    };
    units.push(PlannedUnit {
        name: "consul".into(),
        kind: UnitKind::Consul(mode),
        priority: 10,
        start,
        why: format!("{why}; {mode_text}"),
    });

    for kind in ComponentKind::ALL {
        let facts = kind.facts();
        let (var, alias) = facts.switch;
        let (default, role_why) = match facts.runs_on {
            RunsOn::Every => (true, format!("every host runs {}", facts.name)),
            RunsOn::Slaves => (
                slave,
                format!("the {} runs where SLAVE=true (SLAVE={slave})", facts.name),
            ),
            RunsOn::WhereEnabled => {
                let on = kind.enabled(config);
                (
                    on,
                    format!("the {0} runs only where enabled ({0}.enabled = {on})", facts.name),
                )
            }
        };
        let (start, why) = match env_override(env, var, alias)? {
            Some((on, why)) => (on, why),
            None => (default, role_why),
        };
        units.push(PlannedUnit {
            name: facts.name.into(),
            kind: UnitKind::Component(kind),
            priority: facts.priority,
            start,
            why,
        });
    }

    for (i, p) in config.supervisor.programs.iter().enumerate() {
        units.push(PlannedUnit {
            name: p.name.clone(),
            kind: UnitKind::Program(i),
            priority: p.priority,
            start: p.autostart,
            why: if p.autostart {
                "[[supervisor.program]] autostart".into()
            } else {
                "[[supervisor.program]] autostart = false (start it from the admin API)".into()
            },
        });
    }
    units.sort_by_key(|u| u.priority);
    Ok(Plan {
        master,
        slave,
        consul_hosts: words(env::CONSUL_HOSTS)?,
        consul_params: words(env::CONSUL_PARAMS)?,
        units,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(extra: &str) -> Config {
        let text = format!("[dns]\nupstreams = [\"192.0.2.1\"]\n{extra}");
        let file = crate::config::parse(&text, "test.toml", &HashMap::<String, String>::new()).unwrap();
        crate::config::validate(&file, "test.toml").unwrap()
    }

    fn started(vars: &[(&str, &str)], extra: &str) -> Vec<String> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        plan(&env, &config(extra))
            .unwrap()
            .starting()
            .map(|u| u.name.clone())
            .collect()
    }

    type Vars<'a> = &'a [(&'a str, &'a str)];

    /// The PanteraS table: every MASTER x SLAVE combination, with and without
    /// each override (and its alias).
    #[test]
    fn roles_matrix() {
        let t = "true";
        let f = "false";
        #[rustfmt::skip]
        let cases: &[(Vars, &[&str])] = &[
            // role defaults
            (&[], &["consul", "dns", "lb", "register"]),
            (&[("MASTER", t), ("SLAVE", t)], &["consul", "dns", "lb", "register"]),
            (&[("MASTER", t), ("SLAVE", f)], &["consul", "dns"]),
            (&[("MASTER", f), ("SLAVE", t)], &["consul", "dns", "lb", "register"]),
            (&[("MASTER", f)], &["consul", "dns", "lb", "register"]),
            (&[("MASTER", f), ("SLAVE", f)], &["consul", "dns"]),
            // START_DNS and its alias START_DNSMASQ
            (&[("START_DNS", f)], &["consul", "lb", "register"]),
            (&[("START_DNSMASQ", f)], &["consul", "lb", "register"]),
            (&[("MASTER", f), ("START_DNSMASQ", "0")], &["consul", "lb", "register"]),
            // START_LB and its alias START_CONSUL_TEMPLATE
            (&[("START_LB", f)], &["consul", "dns", "register"]),
            (&[("START_CONSUL_TEMPLATE", f)], &["consul", "dns", "register"]),
            (&[("SLAVE", f), ("START_LB", t)], &["consul", "dns", "lb"]),
            (&[("SLAVE", f), ("START_CONSUL_TEMPLATE", "yes")], &["consul", "dns", "lb"]),
            // START_CONSUL
            (&[("START_CONSUL", f)], &["dns", "lb", "register"]),
            (&[("MASTER", f), ("SLAVE", f), ("START_CONSUL", f)], &["dns"]),
            // START_VPN: the vpn starts before dns (priority 15)
            (&[("START_VPN", t)], &["consul", "vpn", "dns", "lb", "register"]),
            (&[("MASTER", t), ("SLAVE", f), ("START_VPN", "1")], &["consul", "vpn", "dns"]),
            (&[("MASTER", f), ("SLAVE", f), ("START_VPN", "on")], &["consul", "vpn", "dns"]),
            (&[("START_VPN", f)], &["consul", "dns", "lb", "register"]),
            // START_REGISTRATOR
            (&[("START_REGISTRATOR", f)], &["consul", "dns", "lb"]),
            (&[("SLAVE", f), ("START_REGISTRATOR", t)], &["consul", "dns", "register"]),
            // everything off
            (&[("START_CONSUL", f), ("START_DNS", f), ("START_LB", f)], &["register"]),
            (&[("START_CONSUL", f), ("START_DNS", f), ("START_LB", f), ("START_REGISTRATOR", f)], &[]),
            (&[("START_CONSUL", f), ("START_DNS", f), ("START_LB", f), ("START_REGISTRATOR", f), ("START_VPN", t)], &["vpn"]),
        ];
        for (vars, want) in cases {
            assert_eq!(started(vars, ""), *want, "{vars:?}");
        }
        // `vpn.enabled = true` makes the vpn a default of every role; START_VPN
        // still wins in both directions.
        let on = "[vpn]\nenabled = true\n";
        #[rustfmt::skip]
        let enabled: &[(Vars, &[&str])] = &[
            (&[], &["consul", "vpn", "dns", "lb", "register"]),
            (&[("MASTER", t), ("SLAVE", f)], &["consul", "vpn", "dns"]),
            (&[("MASTER", f), ("SLAVE", t)], &["consul", "vpn", "dns", "lb", "register"]),
            (&[("MASTER", f), ("SLAVE", f)], &["consul", "vpn", "dns"]),
            (&[("START_VPN", f)], &["consul", "dns", "lb", "register"]),
            (&[("START_VPN", "0"), ("SLAVE", f)], &["consul", "dns"]),
            (&[("START_VPN", t)], &["consul", "vpn", "dns", "lb", "register"]),
        ];
        for (vars, want) in enabled {
            assert_eq!(started(vars, on), *want, "vpn.enabled, {vars:?}");
        }
    }

    #[test]
    fn vpn_reason_names_the_switch() {
        let why = |vars: &[(&str, &str)], extra: &str| {
            let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let p = plan(&env, &config(extra)).unwrap();
            p.units.iter().find(|u| u.name == "vpn").unwrap().why.clone()
        };
        assert!(why(&[], "").contains("vpn.enabled = false"));
        assert!(why(&[], "[vpn]\nenabled = true\n").contains("vpn.enabled = true"));
        assert_eq!(
            why(&[("START_VPN", "false")], "[vpn]\nenabled = true\n"),
            "START_VPN=false"
        );
        let e = plan(
            &[("START_VPN".to_string(), "maybe".to_string())]
                .into_iter()
                .collect::<HashMap<_, _>>(),
            &config(""),
        )
        .unwrap_err();
        assert_eq!(e.key, "START_VPN", "{e}");
    }

    #[test]
    fn consul_mode_follows_master_and_file_setting_yields_to_env() {
        let env: HashMap<String, String> = [("MASTER".to_string(), "false".to_string())].into();
        let p = plan(&env, &config("")).unwrap();
        assert_eq!(p.units[0].kind, UnitKind::Consul(ConsulMode::Client));
        assert_eq!(p.role(), "slave");
        let p = plan(&HashMap::<String, String>::new(), &config("")).unwrap();
        assert_eq!(p.units[0].kind, UnitKind::Consul(ConsulMode::Server));

        let off = "[supervisor.consul]\nenabled = false\n";
        assert_eq!(started(&[], off), ["dns", "lb", "register"]);
        assert_eq!(
            started(&[("START_CONSUL", "true")], off),
            ["consul", "dns", "lb", "register"]
        );
    }

    #[test]
    fn programs_join_in_priority_order() {
        let extra = "[[supervisor.program]]\nname = \"late\"\ncommand = \"true\"\n\
                     [[supervisor.program]]\nname = \"early\"\ncommand = \"true\"\npriority = 15\n\
                     [[supervisor.program]]\nname = \"manual\"\ncommand = \"true\"\nautostart = false\n";
        assert_eq!(
            started(&[], extra),
            ["consul", "early", "dns", "lb", "register", "late"]
        );
        let p = plan(&HashMap::<String, String>::new(), &config(extra)).unwrap();
        assert!(p.render().contains("off    manual"), "{}", p.render());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let env: HashMap<String, String> = [("SLAVE".to_string(), "maybe".to_string())].into();
        let e = plan(&env, &config("")).unwrap_err();
        assert_eq!((e.file.as_str(), e.key.as_str()), ("environment", "SLAVE"), "{e}");
        let env: HashMap<String, String> = [
            ("START_LB".to_string(), "true".to_string()),
            ("START_CONSUL_TEMPLATE".to_string(), "false".to_string()),
        ]
        .into();
        let e = plan(&env, &config("")).unwrap_err();
        assert!(e.problem.contains("contradicts"), "{e}");
    }

    #[test]
    fn consul_hosts_and_params_are_split() {
        let env: HashMap<String, String> = [
            ("CONSUL_HOSTS".to_string(), "-join=m1 -join=m2".to_string()),
            ("CONSUL_PARAMS".to_string(), "-bootstrap-expect 3".to_string()),
        ]
        .into();
        let p = plan(&env, &config("")).unwrap();
        assert_eq!(p.consul_hosts, ["-join=m1", "-join=m2"]);
        assert_eq!(p.consul_params, ["-bootstrap-expect", "3"]);
    }
}
